"""Typed run config: one source of truth for every number of a run.

A run is chosen by recipe name (recipes.py), optionally a JSON file, then `--set key=value`
overrides. Unknown keys and ill-typed values are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path

from dbot_ds.input_norms import INPUT_NORMS
from dbot_ds.losses import LOSS_TOKENS, LOSSES
from dbot_ds.masking import num_visible
from dbot_ds.models import DecoderArch, ViTArch, vit_arch


class ConfigError(ValueError):
    """Bad run configuration, raised before any expensive work starts."""


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    size: str = "vit_base"
    """Student size, a key of models.sizes.SIZES."""
    img_size: int = 224
    patch_size: int | None = None
    """None: the size's own patch (16, or 14 for vit_huge)."""
    drop_path: float | None = None
    """Student stochastic depth, rising linearly over the encoder blocks and, on a ramp of its
    own, over the decoder blocks; None: 0.3 for vit_huge, 0.2 otherwise."""
    family: str = "vit"
    """vit: MAE's ViT (fixed sin-cos positions, Xavier init); beit: the CLIP recipe's BEiT-style
    ViT (one relative position bias shared by all blocks, no absolute positions, layer scale,
    truncated-normal init with depth rescale), which needs model.decoder=false."""
    layer_scale: float = 0.1
    """beit: the layer scales' initial value."""
    decoder: bool = True
    """MAE's asymmetric decoder; False: the encoder sees mask tokens in place (recipe ⌘)."""
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16

    def encoder_arch(self) -> ViTArch:
        return vit_arch(self.size, img_size=self.img_size, patch_size=self.patch_size, family=self.family,
                        layer_scale=self.layer_scale if self.family == "beit" else None)

    def decoder_arch(self) -> DecoderArch | None:
        if not self.decoder:
            return None
        return DecoderArch(width=self.decoder_width, depth=self.decoder_depth, heads=self.decoder_heads)

    def resolved_drop_path(self) -> float:
        if self.drop_path is not None:
            return self.drop_path
        return 0.3 if self.size == "vit_huge" else 0.2


MASK_KINDS = ("random", "block")


@dataclasses.dataclass(kw_only=True)
class MaskConfig:
    kind: str = "random"
    """random: MAE's per-patch random masking; block: BEiT's block-wise masking (the CLIP
    recipe), for the encoder that sees every position (model.decoder=false)."""
    ratio: float = 0.75
    """random: the masked fraction (visible = int(N x (1 - ratio)), as MAE)."""
    patches: int | None = None
    """block: patches to mask per image (the authors' 78 for B, L and H); None: int(N x ratio)."""
    block_min: int = 16
    """block: the fewest patches in one block."""
    block_aspect: float = 0.3
    """block: blocks' aspect ratio lies in [block_aspect, 1 / block_aspect]."""
    per_image: int = 1
    """Masks per image sharing one teacher forward (data2vec 2.0's trick; the paper uses 1). The
    student sees micro_batch x per_image samples; batch sizes and lr still count images."""

    def num_masked(self, num_patches: int) -> int:
        """block: patches masked per image (BEiT may fall a few short when blocks stop fitting)."""
        return self.patches if self.patches is not None else int(num_patches * self.ratio)


TEACHER_UPDATES = ("breakpoint", "ema", "ema_cosine")


@dataclasses.dataclass(kw_only=True)
class TeacherConfig:
    init: str = "random"
    """Stage-1 teacher: "random", or the path of a dbot-ds export (a pretrained teacher)."""
    random_depth: int | None = None
    """Depth of the random stage-1 teacher; None: the student's; 0: patch + position embedding only."""
    final_norm: bool = False
    """Apply the teacher's final LayerNorm to the target."""
    normalize_target: bool = True
    """Parameter-free per-token normalisation of the target (authors' norm_feature_loss)."""
    project: bool = False
    """Pass the target through the teacher's output projection (CLIP's visual `proj`: width 512
    for CLIP-B/16, 768 for L/14): the CLIP recipe's target, ln_post then proj."""
    heads: int | None = None
    """A weights file's attention heads, for a width with no standard count (192: 3, 384: 6,
    768: 12, 1024 / 1280: 16) and no count in its safetensors metadata."""
    input_norm: str = "auto"
    """The normalisation the teacher sees its images with. auto: the teacher's own (CLIP's
    mean/std for CLIP towers, ImageNet's otherwise: the import report says which; an export's
    meta.json records it); imagenet or clip: override."""
    update: str = "breakpoint"
    """breakpoint: teacher <- student at each stage end; ema / ema_cosine: momentum teacher, 1 stage."""
    momentum: float = 0.9998
    """ema: the constant momentum; ema_cosine: the start value, rising to 1 (e.g. 0.996)."""
    reinit_student: bool = True
    """Re-initialise the student at each breakpoint (False: it keeps its weights)."""


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    kind: str = "smooth_l1"
    """smooth_l1 or cosine (1 - cosine similarity)."""
    beta: float = 2.0
    tokens: str = "cls_and_masked"
    """Tokens the loss averages over: cls_and_masked (main branch) or masked (the CLIP recipe:
    masked patches only)."""


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    base_lr: float = 1.5e-4
    """Peak lr = base_lr * global_batch / 256."""
    lr: float | None = None
    """Absolute peak lr; overrides base_lr scaling when set."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    """AdamW's epsilon (1e-6 in the CLIP recipe)."""
    weight_decay: float = 0.05
    warmup_epochs: float = 40
    min_lr: float = 0.0
    grad_clip: float = 0.0
    """Max global grad norm; 0 = off."""


@dataclasses.dataclass(kw_only=True)
class BatchConfig:
    global_batch: int = 4096
    micro_batch: int = 128
    """Per device; gradient accumulation = global / (micro * world size), derived."""


DATA_SOURCES = ("synthetic", "shards", "generated_shards")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    source: str = "synthetic"
    """synthetic: images generated from the seed, in memory; shards: WebDataset shards
    (data.shards); generated_shards: generated images written as JPEGs, converted to shards in
    <run>/data, then read like any shards."""
    shards: str = ""
    """A manifest.json (exact epochs), or a brace pattern / pipe: URL (resampled; needs epoch_samples)."""
    epoch_samples: int = 0
    """Samples per epoch in resampled mode (0: exact epochs from the manifest)."""
    decode: str = "cpu"
    """Shards only: cpu (loader workers decode and crop) or device (workers read bytes and draw
    crop boxes; the accelerator decodes with torchvision.io.decode_jpeg)."""
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01
    """Training stops when more than this fraction of a worker's samples is unreadable."""
    synthetic_images: int = 4096
    synthetic_size: int | None = None
    """Side of generated images before cropping; None: 5/4 of the model's img_size."""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop's area range (aspect ratio 3/4..4/3, bicubic)."""
    color_jitter: float = 0.0
    """Brightness, contrast and saturation jitter strength (0.4 in the CLIP recipe's code; the
    paper's Table A1 lists none); CPU decode only."""
    hflip: bool = True
    num_workers: int = 8


@dataclasses.dataclass(kw_only=True)
class StagesConfig:
    epochs: list[int] = dataclasses.field(default_factory=lambda: [800, 800])
    """Epochs per stage; len = number of stages K."""


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resume checkpoint every N optimizer steps; 0: at the end of every epoch."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one is complete)."""


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    recipe: str = "custom"
    seed: int = 0
    deepspeed: str = "vit_base"
    """A ds_configs/ name or a JSON path: ZeRO stage and bf16 live there, batch sizes do not."""
    compile: str = ""
    """torch.compile backend for student and teacher ("inductor"); "": eager. Falls back to
    eager with a warning where the backend is unavailable."""
    cuda_graph_teacher: bool = False
    """Replay the teacher's forward from a CUDA graph (one per input shape; after compile when
    both are on). Saves kernel-launch time; costs one forward's activations of reserved memory.
    Falls back to eager with a warning without CUDA."""
    log_every: int = 20
    stop_at_step: int = 0
    """Save a checkpoint and exit once this many optimizer steps (all stages) are done; 0: run to the end."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mask: MaskConfig = dataclasses.field(default_factory=MaskConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stages: StagesConfig = dataclasses.field(default_factory=StagesConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        problems = []

        def check(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        arch = None
        try:
            arch = self.model.encoder_arch()
            self.model.decoder_arch()
            num_visible(arch.num_patches, self.mask.ratio)
        except ValueError as e:
            problems.append(str(e))
        check(self.mask.per_image >= 1, "mask.per_image must be >= 1")
        check(self.model.family != "beit" or not self.model.decoder,
              "model.family=beit has no absolute positions for an encoder of the visible patches "
              "only: use it with model.decoder=false")
        check(self.mask.kind in MASK_KINDS, f"mask.kind {self.mask.kind!r} is not one of {MASK_KINDS}")
        if self.mask.kind == "block":
            check(not self.model.decoder, "mask.kind=block masks a varying number of patches per image, "
                  "which the asymmetric encoder cannot batch: use it with model.decoder=false")
            if arch is not None:
                n = arch.num_patches
                check(1 <= self.mask.num_masked(n) < n, f"mask.patches must be in 1..{n - 1}")
            check(self.mask.block_min >= 1 and 0 < self.mask.block_aspect <= 1,
                  "mask.block_min must be >= 1 and mask.block_aspect in (0, 1]")
        check(self.loss.kind in LOSSES, f"loss.kind {self.loss.kind!r} is not one of {LOSSES}")
        check(self.loss.tokens in LOSS_TOKENS, f"loss.tokens {self.loss.tokens!r} is not one of {LOSS_TOKENS}")
        norms = ("auto", *INPUT_NORMS)
        check(self.teacher.input_norm in norms, f"teacher.input_norm {self.teacher.input_norm!r} is not one of {norms}")
        check(self.teacher.init != "", "this recipe needs a teacher: --set teacher.init=PATH "
              "(a dbot-ds export directory, or timm / DINO / MAE / CLIP weights)")
        check(self.teacher.update in TEACHER_UPDATES,
              f"teacher.update {self.teacher.update!r} is not one of {TEACHER_UPDATES}")
        check(len(self.stages.epochs) >= 1 and all(e >= 1 for e in self.stages.epochs),
              f"stages.epochs must be a non-empty list of positive ints, got {self.stages.epochs}")
        if self.teacher.update != "breakpoint":
            check(len(self.stages.epochs) == 1, "an EMA teacher (teacher.update="
                  f"{self.teacher.update}) replaces breakpoints: set stages.epochs to one stage")
            check(self.teacher.random_depth is None and self.teacher.init == "random",
                  "an EMA teacher starts as a copy of the student: leave teacher.random_depth "
                  "and teacher.init at their defaults")
            check(0.0 < self.teacher.momentum < 1.0, "teacher.momentum must be in (0, 1)")
        check(self.batch.micro_batch >= 1 and self.batch.global_batch >= 1,
              "batch.micro_batch and batch.global_batch must be >= 1")
        check(self.batch.global_batch % self.batch.micro_batch == 0,
              f"batch.global_batch {self.batch.global_batch} is not a multiple of "
              f"batch.micro_batch {self.batch.micro_batch}")
        check(self.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
        check(self.optim.eps > 0, "optim.eps must be > 0")
        check(self.data.source in DATA_SOURCES,
              f"data.source {self.data.source!r} is not one of {DATA_SOURCES}")
        check(self.data.decode in ("cpu", "device"), f"data.decode {self.data.decode!r}: cpu or device")
        check(self.data.decode == "cpu" or self.data.source != "synthetic",
              "data.decode=device needs JPEG shards (data.source=shards or generated_shards)")
        check(self.data.source != "shards" or bool(self.data.shards),
              "data.source=shards needs data.shards (a manifest.json, a brace pattern or a pipe: URL)")
        check(0 < self.data.crop_scale[0] <= self.data.crop_scale[1] <= 1,
              f"data.crop_scale {self.data.crop_scale} must satisfy 0 < lo <= hi <= 1")
        check(self.data.color_jitter >= 0, "data.color_jitter must be >= 0")
        check(self.data.color_jitter == 0 or self.data.decode == "cpu",
              "data.color_jitter runs in the CPU loader workers: use it with data.decode=cpu")
        check(self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
        if problems:
            raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))

    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else \
            self.optim.base_lr * self.batch.global_batch / 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- building configs from dicts, files and --set overrides ----

def _coerce(value, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (object), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and len(args) != len(value) and Ellipsis not in args:
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        items = [_coerce(v, args[0] if origin is list or Ellipsis in args else a, key)
                 for v, a in zip(value, args if origin is tuple else [args[0]] * len(value))]
        return origin(items)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and
                                               not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{key} must be {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; "
                          f"known keys in this section: {', '.join(prefix + n for n in sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(item: str) -> dict:
    """'optim.base_lr=1e-4' -> {'optim': {'base_lr': 1e-4}}; values parse as JSON, else as text."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set mask.ratio=0.8")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node: dict = {}
    out = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def load_config(recipe: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] = ()) -> RunConfig:
    from dbot_ds.recipes import recipe_dict

    data: dict = recipe_dict(recipe) if recipe else {}
    if config_file:
        try:
            data = deep_merge(data, json.loads(Path(config_file).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config file {config_file}: {e}") from e
    for item in overrides:
        data = deep_merge(data, parse_set(item))
    return from_dict(RunConfig, data)
