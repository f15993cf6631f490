"""A dBOT pre-training run's config (`dbot-ds pretrain`): one section per component."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from dbot_ds.config.training import Checks, TrainingConfig, paper_drop_path
from dbot_ds.models.decoder import DecoderArch
from dbot_ds.models.sizes import ViTArch, num_visible, vit_arch


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
    grad_checkpointing: bool = False
    """Recompute each student block (encoder and decoder) in the backward instead of keeping its
    activations: less memory for ViT-H or large micro-batches, about a third more compute."""
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
    input_norm: Literal["auto", "imagenet", "clip", "inception"] = "auto"  # the keys of input_norms.INPUT_NORMS
    """The normalisation the teacher sees its images with. auto: the teacher's own (CLIP's
    mean/std for CLIP towers, ImageNet's otherwise: the import report says which; an export's
    meta.json records it; timm models normalised to 0.5 / 0.5, as augreg ViTs: inception);
    imagenet, clip or inception: override."""
    update: Literal["breakpoint", "ema", "ema_cosine"] = "breakpoint"
    """breakpoint: teacher <- student at each stage end; ema / ema_cosine: momentum teacher, 1 stage."""
    momentum: float = 0.9998
    """ema: the constant momentum; ema_cosine: the start value, rising to 1 (e.g. 0.996)."""
    reinit_student: bool = True
    """Re-initialise the student at each breakpoint (False: it keeps its weights)."""


LossKind = Literal["smooth_l1", "cosine"]
LossTokens = Literal["cls_and_masked", "masked"]


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    kind: LossKind = "smooth_l1"
    """smooth_l1 or cosine (1 - cosine similarity)."""
    beta: float = 2.0
    tokens: LossTokens = "cls_and_masked"
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
    verify: Literal["size", "sha256"] = "size"
    """Shards are checked against the manifest as they are opened: size (a stat), or sha256 too
    (hashed as they stream, no second read; a shard's samples are held until its hash is known:
    up to one shard in memory per loader worker); a mismatch makes the shard's samples bad."""
    pipe_urls: bool = False
    """Let the manifest's pipe: URLs run (shell commands that fetch shards, e.g. from S3): only
    for a manifest you trust."""
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
