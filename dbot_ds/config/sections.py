"""Typed configs: one source of truth for every number of a run, one section per component.

Pre-training (RunConfig) and fine-tuning (FinetuneConfig) share their training sections (optim,
batch, checkpoint) and the rules on them (peak lr, batch arithmetic); probe and bench have
configs of their own. Choices are Literal types, checked by the same coercion (schema.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from dbot_ds.config.schema import ConfigError
from dbot_ds.models.sizes import num_visible
from dbot_ds.models.decoder import DecoderArch
from dbot_ds.models.sizes import ViTArch, vit_arch


def paper_drop_path(arch: ViTArch) -> float:
    """The paper's stochastic depth for a size, pre-training and fine-tuning alike: 0.3 for
    ViT-H (1280 wide), 0.2 otherwise."""
    return 0.3 if arch.width >= 1280 else 0.2


class Checks:
    """Collects every problem of a config, to report them together."""

    def __init__(self):
        self.problems: list[str] = []

    def __call__(self, ok: bool, message: str) -> None:
        if not ok:
            self.problems.append(message)

    def raise_any(self, what: str) -> None:
        if self.problems:
            raise ConfigError(f"invalid {what}:\n  - " + "\n  - ".join(self.problems))


def positive_number(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# ---------------------------------------------------------------- shared training sections

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
    layer_decay: float = 1.0
    """Layer-wise lr decay (fine-tuning); 1: none."""

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / 256

    def check(self, check: Checks, prefix: str = "optim.") -> None:
        for name in ("base_lr", "eps"):
            check(positive_number(getattr(self, name)), f"{prefix}{name} must be a finite number > 0")
        check(self.lr is None or positive_number(self.lr), f"{prefix}lr must be a finite number > 0")
        check(all(0 <= b < 1 for b in self.betas), f"{prefix}betas must lie in [0, 1), got {self.betas}")
        check(math.isfinite(self.min_lr) and self.min_lr >= 0, f"{prefix}min_lr must be >= 0")
        check(self.warmup_epochs >= 0, f"{prefix}warmup_epochs must be >= 0")
        check(self.weight_decay >= 0 and self.grad_clip >= 0, f"{prefix}weight_decay and grad_clip must be >= 0")
        check(0 < self.layer_decay <= 1, f"{prefix}layer_decay must lie in (0, 1]")


@dataclasses.dataclass(kw_only=True)
class BatchConfig:
    global_batch: int = 4096
    micro_batch: int = 128
    """Per device; gradient accumulation = global / (micro * world size), derived."""

    def check(self, check: Checks) -> None:
        check(self.micro_batch >= 1 and self.global_batch >= 1, "batch.micro_batch and batch.global_batch must be >= 1")
        check(self.micro_batch < 1 or self.global_batch % self.micro_batch == 0,
              f"batch.global_batch {self.global_batch} is not a multiple of batch.micro_batch {self.micro_batch}")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a resume checkpoint every N optimizer steps; 0: at the end of every epoch."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one is complete)."""

    def check(self, check: Checks) -> None:
        check(self.every_steps >= 0 and self.keep >= 1, "checkpoint.every_steps must be >= 0, checkpoint.keep >= 1")


@dataclasses.dataclass(kw_only=True)
class TrainingConfig:
    """What every training command has: the loop's settings and its shared sections."""
    recipe: str = "custom"
    seed: int = 0
    deepspeed: str = "vit_base"
    """A ds_configs/ name or a JSON path: ZeRO stage and bf16 live there, batch sizes do not."""
    log_every: int = 20
    stop_at_step: int = 0
    """Save a checkpoint and exit once this many optimizer steps (all stages) are done; 0: run to the end."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    # Keys that may change between a checkpoint and its resume; any other difference is an error.
    MAY_CHANGE: ClassVar[tuple[str, ...]] = ("stop_at_step", "log_every", "checkpoint.every_steps",
                                             "checkpoint.keep")

    def __post_init__(self):
        check = Checks()
        self.validate(check)
        check.raise_any(f"{type(self).__name__}")

    def validate(self, check: Checks) -> None:
        check(self.log_every >= 1, "log_every must be >= 1")
        check(self.stop_at_step >= 0, "stop_at_step must be >= 0")
        self.optim.check(check)
        self.batch.check(check)
        self.checkpoint.check(check)

    def peak_lr(self) -> float:
        return self.optim.peak_lr(self.batch.global_batch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- pre-training

@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    size: str = "vit_base"
    """Student size, a key of models.sizes.SIZES."""
    img_size: int = 224
    patch_size: int | None = None
    """None: the size's own patch (16, or 14 for vit_huge)."""
    drop_path: float | None = None
    """Student stochastic depth, rising linearly over the encoder blocks and, on a ramp of its
    own, over the decoder blocks; None: the paper's (paper_drop_path)."""
    family: Literal["vit", "beit"] = "vit"
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
        return self.drop_path if self.drop_path is not None else paper_drop_path(self.encoder_arch())


@dataclasses.dataclass(kw_only=True)
class MaskConfig:
    kind: Literal["random", "block"] = "random"
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


@dataclasses.dataclass(kw_only=True)
class TeacherConfig:
    init: str = "random"
    """Stage-1 teacher: "random", a dbot-ds export directory, or a weights file (timm / DINO /
    MAE / CLIP)."""
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
    input_norm: Literal["auto", "imagenet", "clip"] = "auto"  # the keys of input_norms.INPUT_NORMS
    """The normalisation the teacher sees its images with. auto: the teacher's own (CLIP's
    mean/std for CLIP towers, ImageNet's otherwise: the import report says which; an export's
    meta.json records it); imagenet or clip: override."""
    update: Literal["breakpoint", "ema", "ema_cosine"] = "breakpoint"
    """breakpoint: teacher <- student at each stage end; ema / ema_cosine: momentum teacher, 1 stage."""
    momentum: float = 0.9998
    """ema: the constant momentum; ema_cosine: the start value, rising to 1 (e.g. 0.996)."""
    reinit_student: bool = True
    """Re-initialise the student at each breakpoint (False: it keeps its weights)."""


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    kind: Literal["smooth_l1", "cosine"] = "smooth_l1"
    """smooth_l1 or cosine (1 - cosine similarity)."""
    beta: float = 2.0
    tokens: Literal["cls_and_masked", "masked"] = "cls_and_masked"
    """Tokens the loss averages over: cls_and_masked (main branch) or masked (the CLIP recipe:
    masked patches only)."""


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    source: Literal["synthetic", "shards", "generated_shards"] = "synthetic"
    """synthetic: images generated from the seed, in memory; shards: WebDataset shards
    (data.shards); generated_shards: generated images written as JPEGs, converted to shards in
    <run>/data, then read like any shards."""
    shards: str = ""
    """A manifest.json (exact epochs), or a brace pattern / pipe: URL (resampled; needs epoch_samples)."""
    epoch_samples: int = 0
    """Samples per epoch in resampled mode (0: exact epochs from the manifest)."""
    decode: Literal["cpu", "device"] = "cpu"
    """Shards only: cpu (loader workers decode and crop) or device (workers read bytes and draw
    crop boxes; the accelerator decodes, crops and resizes)."""
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
class RunConfig(TrainingConfig):
    """A dBOT pre-training run (`dbot-ds pretrain`)."""
    compile: str = ""
    """torch.compile backend for student and teacher ("inductor"); "": eager. Falls back to
    eager with a warning where the backend is unavailable."""
    cuda_graph_teacher: bool = False
    """Replay the teacher's forward from a CUDA graph (one per input shape; after compile when
    both are on). Saves kernel-launch time; costs one forward's activations of reserved memory.
    Falls back to eager with a warning without CUDA."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mask: MaskConfig = dataclasses.field(default_factory=MaskConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stages: StagesConfig = dataclasses.field(default_factory=StagesConfig)

    MAY_CHANGE: ClassVar[tuple[str, ...]] = (*TrainingConfig.MAY_CHANGE, "compile", "cuda_graph_teacher",
                                             "data.num_workers")

    def validate(self, check: Checks) -> None:
        super().validate(check)
        arch = None
        try:
            arch = self.model.encoder_arch()
            self.model.decoder_arch()
            num_visible(arch.num_patches, self.mask.ratio)
        except ValueError as e:
            check(False, str(e))
        check(self.mask.per_image >= 1, "mask.per_image must be >= 1")
        check(self.model.family != "beit" or not self.model.decoder,
              "model.family=beit has no absolute positions for an encoder of the visible patches "
              "only: use it with model.decoder=false")
        if self.mask.kind == "block":
            check(not self.model.decoder, "mask.kind=block masks a varying number of patches per image, "
                  "which the asymmetric encoder cannot batch: use it with model.decoder=false")
            if arch is not None:
                n = arch.num_patches
                check(1 <= self.mask.num_masked(n) < n, f"mask.patches must be in 1..{n - 1}")
            check(self.mask.block_min >= 1 and 0 < self.mask.block_aspect <= 1,
                  "mask.block_min must be >= 1 and mask.block_aspect in (0, 1]")
        check(self.teacher.init != "", "this recipe needs a teacher: --set teacher.init=PATH "
              "(a dbot-ds export directory, or timm / DINO / MAE / CLIP weights)")
        check(len(self.stages.epochs) >= 1 and all(e >= 1 for e in self.stages.epochs),
              f"stages.epochs must be a non-empty list of positive ints, got {self.stages.epochs}")
        if self.teacher.update != "breakpoint":
            check(len(self.stages.epochs) == 1, "an EMA teacher (teacher.update="
                  f"{self.teacher.update}) replaces breakpoints: set stages.epochs to one stage")
            check(self.teacher.random_depth is None and self.teacher.init == "random",
                  "an EMA teacher starts as a copy of the student: leave teacher.random_depth "
                  "and teacher.init at their defaults")
            check(0.0 < self.teacher.momentum < 1.0, "teacher.momentum must be in (0, 1)")
        d = self.data
        check(d.decode == "cpu" or d.source != "synthetic",
              "data.decode=device needs JPEG shards (data.source=shards or generated_shards)")
        check(d.source != "shards" or bool(d.shards),
              "data.source=shards needs data.shards (a manifest.json, a brace pattern or a pipe: URL)")
        check(0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
              f"data.crop_scale {d.crop_scale} must satisfy 0 < lo <= hi <= 1")
        check(d.color_jitter >= 0, "data.color_jitter must be >= 0")
        check(d.color_jitter == 0 or d.decode == "cpu",
              "data.color_jitter runs in the CPU loader workers: use it with data.decode=cpu")
        check(d.shuffle_buffer >= 1 and d.num_workers >= 0 and d.synthetic_images >= 1,
              "data.shuffle_buffer and data.synthetic_images must be >= 1, data.num_workers >= 0")
        check(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction must lie in [0, 1]")


# ---------------------------------------------------------------- fine-tuning

@dataclasses.dataclass(kw_only=True)
class FinetuneOptimConfig(OptimConfig):
    """Table A2's optimizer: AdamW (0.9, 0.999), 5 warm-up epochs, cosine to 1e-6, layer decay."""
    base_lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5
    min_lr: float = 1e-6
    layer_decay: float = 0.75


@dataclasses.dataclass(kw_only=True)
class FinetuneBatchConfig(BatchConfig):
    global_batch: int = 1024


@dataclasses.dataclass(kw_only=True)
class ClassifierConfig:
    drop_path: float | None = None
    """None: the paper's (paper_drop_path)."""
    head_init_std: float = 0.01
    """ViT classifiers: the head's truncated-normal std (the authors' 0.01). BEiT-style ones use
    BEiT's init, normal(0.02) scaled by 0.001."""


@dataclasses.dataclass(kw_only=True)
class AugmentConfig:
    randaug: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: Literal["pixel", "const", "rand"] = "pixel"
    """Random erasing fills with per-pixel noise, as the authors' scripts."""
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1


@dataclasses.dataclass(kw_only=True)
class LabelledDataConfig:
    train: str = ""
    """Labelled train shards (manifest.json)."""
    val: str = ""
    """Labelled validation shards (manifest.json)."""
    num_workers: int = 8


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig(TrainingConfig):
    """End-to-end fine-tuning of an encoder (`dbot-ds finetune`)."""
    init: str = ""
    """The encoder to fine-tune: a stage export, teacher:<stage-1 export> (its random teacher:
    supervised training from scratch), or a weights file."""
    epochs: int = 100
    """Table A2: 100 for ViT-B, 50 for ViT-L/H."""
    optim: FinetuneOptimConfig = dataclasses.field(default_factory=FinetuneOptimConfig)
    batch: FinetuneBatchConfig = dataclasses.field(default_factory=FinetuneBatchConfig)
    model: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    data: LabelledDataConfig = dataclasses.field(default_factory=LabelledDataConfig)

    MAY_CHANGE: ClassVar[tuple[str, ...]] = (*TrainingConfig.MAY_CHANGE, "data.num_workers")
    # the flat keys of the first fine-tuning config, still accepted (with a deprecation warning)
    RENAMED: ClassVar[dict[str, str]] = {
        **{k: f"optim.{k}" for k in ("base_lr", "lr", "min_lr", "layer_decay", "weight_decay", "betas",
                                     "grad_clip", "warmup_epochs")},
        **{k: f"batch.{k}" for k in ("global_batch", "micro_batch")},
        **{k: f"model.{k}" for k in ("drop_path", "head_init_std")},
        **{k: f"augment.{k}" for k in ("randaug", "reprob", "remode", "mixup", "cutmix", "smoothing")},
        **{k: f"data.{k}" for k in ("train", "val", "num_workers")},
    }

    def validate(self, check: Checks) -> None:
        super().validate(check)
        missing = [k for k, v in (("init", self.init), ("--train", self.data.train), ("--val", self.data.val)) if not v]
        check(not missing, f"finetune needs {', '.join(missing)}")
        check(self.epochs >= 1 and self.data.num_workers >= 0, "epochs must be >= 1 and data.num_workers >= 0")
        a = self.augment
        check(a.mixup >= 0 and a.cutmix >= 0 and 0 <= a.smoothing < 1 and 0 <= a.reprob <= 1,
              "augment.mixup and augment.cutmix must be >= 0, augment.smoothing in [0, 1), augment.reprob in [0, 1]")


# ---------------------------------------------------------------- evaluation and benchmarks

@dataclasses.dataclass(kw_only=True)
class ProbeConfig:
    """k-NN and linear probe on frozen features (`dbot-ds probe`)."""
    encoders: list[str] = dataclasses.field(default_factory=list)
    train: str = ""
    val: str = ""
    pool: Literal["avg", "cls"] = "avg"
    k: int = 20
    temperature: float = 0.07
    epochs: int = 100
    """Linear-probe epochs on cached features."""
    workers: int = 2
    json: str | None = None

    def __post_init__(self):
        check = Checks()
        check(bool(self.encoders) and bool(self.train) and bool(self.val), "probe needs encoders, --train and --val")
        check(self.k >= 1 and self.epochs >= 1 and self.temperature > 0 and self.workers >= 0,
              "--k and --epochs must be >= 1, --temperature > 0, --workers >= 0")
        check.raise_any("probe config")


@dataclasses.dataclass(kw_only=True)
class BenchConfig:
    """The training-step benchmark's sweep (`dbot-ds bench`)."""
    sizes: list[str] = dataclasses.field(default_factory=lambda: ["vit_base"])
    micro: list[int] = dataclasses.field(default_factory=lambda: [64])
    accum: list[int] = dataclasses.field(default_factory=lambda: [1])
    zero: list[int] = dataclasses.field(default_factory=lambda: [1])
    compile: list[str] = dataclasses.field(default_factory=lambda: ["off"])
    teacher_graph: list[Literal["off", "on"]] = dataclasses.field(default_factory=lambda: ["off"])
    overlap_comm: list[Literal["auto", "on", "off"]] = dataclasses.field(default_factory=lambda: ["auto"])
    img_size: int = 224
    steps: int = 20
    warmup: int = 5
    repeats: int = 3
    peak_tflops: float | None = None
    fp32: bool = False
    no_plain: bool = False
    data: Literal["synthetic", "shards"] = "synthetic"
    shards: str | None = None
    workers: int = 8
    decode: Literal["cpu", "device"] = "cpu"
    set: list[str] = dataclasses.field(default_factory=list)
    """Run-config overrides (key=value), as `dbot-ds pretrain --set`."""
    json: str | None = None
    markdown: bool = False

    def __post_init__(self):
        check = Checks()
        check(min(self.micro + self.accum) >= 1 and self.steps >= 1 and self.repeats >= 1 and self.warmup >= 0,
              "--micro, --accum, --steps and --repeats must be >= 1, --warmup >= 0")
        check(all(z in (0, 1, 2, 3) for z in self.zero), f"--zero takes ZeRO stages 0..3, got {self.zero}")
        check(self.data == "synthetic" or bool(self.shards), "--data shards needs --shards MANIFEST")
        check.raise_any("bench config")
