"""A fine-tuning run's config (`dbot-ds finetune`): Table A2's defaults, in sections like
pre-training's; the first release's flat key names map onto them (RENAMED)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from dbot_ds.config.training import BatchConfig, Checks, OptimConfig, TrainingConfig


@dataclasses.dataclass(kw_only=True)
class FinetuneOptimConfig(OptimConfig):
    """Table A2's optimizer: AdamW (0.9, 0.999), 5 warm-up epochs, cosine to 1e-6, layer decay."""
    base_lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5
    min_lr: float = 1e-6
    layer_decay: float = 0.75
    """Layer-wise lr decay: a block's lr is layer_decay ** (blocks above it) of the head's; 1: none."""

    def check(self, check: Checks, prefix: str = "optim.") -> None:
        super().check(check, prefix)
        check(0 < self.layer_decay <= 1, f"{prefix}layer_decay must lie in (0, 1]")


@dataclasses.dataclass(kw_only=True)
class FinetuneBatchConfig(BatchConfig):
    global_batch: int = 1024


@dataclasses.dataclass(kw_only=True)
class ClassifierConfig:
    drop_path: float | None = None
    """None: the paper's (paper_drop_path)."""
    grad_checkpointing: bool = False
    """Recompute each block in the backward (timm's set_grad_checkpointing)."""
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
    verify: Literal["size", "sha256"] = "size"
    """The train shards' check against the manifest (as pre-training's data.verify)."""
    pipe_urls: bool = False
    """Let the manifests' pipe: URLs run (as pre-training's data.pipe_urls)."""


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
