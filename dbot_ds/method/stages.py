"""Stages: their step arithmetic and the student each one starts with.

Stage numbers are 1-based everywhere (directories, meta.json, logs). The student restarts at each
breakpoint from a seed that depends only on (run seed, stage), so every rank re-initialises it
identically; the "student re-init off" ablation keeps the previous stage's weights instead.
"""

from __future__ import annotations

import dataclasses

import torch

from dbot_ds.config import ConfigError, RunConfig
from dbot_ds.method.student import Student
from dbot_ds.seeding import derive_seed


@dataclasses.dataclass(frozen=True)
class StagePlan:
    epochs: tuple[int, ...]
    steps_per_epoch: int

    @property
    def num_stages(self) -> int:
        return len(self.epochs)

    def steps(self, stage: int) -> int:
        return self.epochs[stage - 1] * self.steps_per_epoch

    def global_step(self, stage: int, step: int) -> int:
        """Optimizer steps done in all stages before `stage`, plus `step`."""
        return sum(self.epochs[: stage - 1]) * self.steps_per_epoch + step


def fresh_student(cfg: RunConfig, stage: int, target_width: int) -> Student:
    """Built from (seed, stage) alone, with the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "student", stage))
        student = Student(cfg.model.encoder_arch(), cfg.model.decoder_arch(), target_width,
                          cfg.model.resolved_drop_path())
    student.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return student


def keep_weights(student: Student, previous: dict[str, torch.Tensor], stage: int) -> Student:
    """Stage `stage` - 1's student weights into stage `stage`'s (ablation "student re-init off");
    a head of another width starts fresh."""
    own = student.state_dict()
    kept = {k: v for k, v in previous.items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(kept) - {k for k in own if k.startswith("head.")}
    if missing:
        raise ConfigError(f"stage {stage - 1}'s export does not fit stage {stage}'s student: missing {sorted(missing)}")
    student.load_state_dict(kept, strict=False)
    return student
