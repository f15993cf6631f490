"""What every training command's config has: the loop's settings, the shared sections (optim,
batch, checkpoint) and the rules on them (peak lr, batch arithmetic, one drop-path rule), and
the Checks that collect a config's problems to report them together."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import ClassVar, Literal

from dbot_ds.config.schema import ConfigError
from dbot_ds.models.sizes import ViTArch


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

    def peak_lr(self, global_batch: int) -> float:
        return self.lr if self.lr is not None else self.base_lr * global_batch / 256

    def check(self, check: Checks, prefix: str = "optim.") -> None:
        for name in ("base_lr", "eps"):
            check(positive_number(getattr(self, name)), f"{prefix}{name} must be a finite number > 0")
        check(self.lr is None or positive_number(self.lr), f"{prefix}lr must be a finite number > 0")
        check(all(0 <= b < 1 for b in self.betas), f"{prefix}betas must lie in [0, 1), got {self.betas}")
        check(math.isfinite(self.min_lr) and self.min_lr >= 0, f"{prefix}min_lr must be >= 0")
        check(all(math.isfinite(v) and v >= 0 for v in (self.weight_decay, self.grad_clip, self.warmup_epochs)),
              f"{prefix}weight_decay, grad_clip and warmup_epochs must be finite and >= 0")


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
class DivergenceConfig:
    """What a run does when it diverges: a non-finite loss in a log window, or more skipped
    (non-finite-gradient) optimizer steps in one than allowed."""
    policy: Literal["stop", "rollback"] = "stop"
    """stop: exit non-zero naming the last good checkpoint, write no export; rollback: reload the
    last good checkpoint and go on past the data that diverged, at most max_rollbacks times."""
    max_skipped_steps: int = 0
    """Skipped optimizer steps tolerated in one log window."""
    max_rollbacks: int = 3

    def check(self, check: Checks) -> None:
        check(self.max_skipped_steps >= 0 and self.max_rollbacks >= 0,
              "divergence.max_skipped_steps and divergence.max_rollbacks must be >= 0")


@dataclasses.dataclass(kw_only=True)
class LogConfig:
    wandb: str = ""
    """A Weights & Biases project to log to as well (rank 0; WANDB_MODE=offline on nodes without
    network, then `wandb sync`); "": none. JSON lines and TensorBoard are always written."""


@dataclasses.dataclass(kw_only=True)
class ProfileConfig:
    steps: str = ""
    """A:B: a torch.profiler trace of optimizer steps A..B-1 (counted over all stages), one per
    rank in <run>/profile (TensorBoard and Perfetto read it); "": none."""
    memory: bool = False
    """With steps: a CUDA memory snapshot of those steps too (GPU only)."""

    def window(self) -> tuple[int, int] | None:
        if not self.steps:
            return None
        a, b = (int(x) for x in self.steps.split(":"))
        return a, b

    def check(self, check: Checks) -> None:
        try:
            window = self.window()
        except ValueError:
            window = (0, -1)
        check(window is None or 0 <= window[0] < window[1],
              f"profile.steps {self.steps!r}: give A:B with 0 <= A < B, e.g. profile.steps=10:15")
        check(not self.memory or window is not None,
              "profile.memory records the steps of profile.steps: give both, e.g. profile.steps=10:15")


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
    divergence: DivergenceConfig = dataclasses.field(default_factory=DivergenceConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)

    # Keys that may change between a checkpoint and its resume; any other difference is an error.
    MAY_CHANGE: ClassVar[tuple[str, ...]] = ("stop_at_step", "log_every", "checkpoint.every_steps",
                                             "checkpoint.keep", "divergence.policy", "divergence.max_skipped_steps",
                                             "divergence.max_rollbacks", "log.wandb", "profile.steps",
                                             "profile.memory")

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
        self.divergence.check(check)
        self.profile.check(check)
        check(not self.log.wandb or importlib.util.find_spec("wandb") is not None,
              "log.wandb needs the wandb package: pip install wandb")

    def peak_lr(self) -> float:
        return self.optim.peak_lr(self.batch.global_batch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
