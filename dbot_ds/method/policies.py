"""How the teacher evolves, behind one interface: which teacher (and so which student head) a
stage starts with, what happens to it after each optimizer step, what a checkpoint keeps of it
(a JSON state, tensors) and checks on resume.

- BreakpointPolicy (the paper's dBOT, momentum 0 at each breakpoint, 1 otherwise): stage k's
  teacher is stage k-1's export; stage 1's a random or pretrained one. Nothing moves in a stage;
  a checkpoint records the teacher's identity (sha256), checked on resume.
- EmaPolicy (Table 6c): one stage; the teacher starts as a copy of the student's encoder and
  follows it after every step with a constant momentum, or one rising from `start` to 1 on a
  cosine; a checkpoint keeps its weights.

The loop and the checkpoint module know neither: they call the policy.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, ContextManager, Iterable

import torch
from dbot_ds.config import ConfigError, RunConfig
from dbot_ds.input_norms import STUDENT_NORM
from dbot_ds.method.student import Student
from dbot_ds.method.teacher import Teacher, TeacherWeights, build_teacher

# (parameters) -> a context in which they are whole on this rank (ZeRO-3 gathers them)
Gather = Callable[[Iterable[torch.nn.Parameter]], ContextManager]


def momentum_at(step: int, total_steps: int, start: float, cosine: bool) -> float:
    """Constant momentum, or cosine from `start` to 1 over the run (BYOL/DINO)."""
    if not cosine:
        return start
    return 1.0 - (1.0 - start) * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


class BreakpointPolicy:
    def __init__(self, cfg: RunConfig, source: Callable[[int], TeacherWeights], dtype: torch.dtype):
        """source(stage) -> the checked weights of that stage's teacher."""
        self.cfg, self.source, self.dtype = cfg, source, dtype

    def start(self, stage: int, make_student: Callable[[int], Student]) -> tuple[Teacher, Student]:
        """The stage's teacher, and a student whose head predicts its targets' width."""
        teacher = build_teacher(self.cfg, self.source(stage), self.dtype)
        return teacher, make_student(teacher.target_width)

    def after_step(self, teacher: Teacher, student: Student, step: int, total: int, gather: Gather) -> None:
        pass  # momentum 1 within a stage

    def state(self, teacher: Teacher) -> dict:
        return {"teacher": teacher.identity}

    def tensors(self, teacher: Teacher) -> dict[str, torch.Tensor]:
        return {}  # the teacher is an export already, named by its sha256

    def restore(self, teacher: Teacher, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        if state.get("teacher") != teacher.identity:
            raise ConfigError(
                f"the checkpoint was trained against teacher {state.get('teacher')}, but stage "
                f"{state.get('stage')}'s teacher is now {teacher.identity}: the stage {state.get('stage', 1) - 1} "
                "export changed since; restore it, or start a new run")


class EmaPolicy:
    def __init__(self, cfg: RunConfig, bf16: bool):
        self.cfg, self.autocast = cfg, torch.bfloat16 if bf16 else None
        self.cosine = cfg.teacher.update == "ema_cosine"

    def start(self, stage: int, make_student: Callable[[int], Student]) -> tuple[Teacher, Student]:
        """The student, and a copy of its encoder as the teacher, kept in fp32 (it changes by
        small steps)."""
        student = make_student(self.cfg.model.encoder_arch().width)
        weights = TeacherWeights(copy.deepcopy(student.encoder), "ema", STUDENT_NORM)
        return build_teacher(self.cfg, weights, torch.float32, autocast=self.autocast), student

    @torch.no_grad()
    def after_step(self, teacher: Teacher, student: Student, step: int, total: int, gather: Gather) -> None:
        """teacher <- m * teacher + (1 - m) * student encoder: two fused kernels over all tensors
        (add_ takes a bf16 student into the fp32 teacher as it is)."""
        m = momentum_at(step, total, self.cfg.teacher.momentum, self.cosine)
        params = list(student.encoder.parameters())
        with gather(params):
            own = list(teacher.encoder.parameters())
            torch._foreach_mul_(own, m)
            torch._foreach_add_(own, [p.detach() for p in params], alpha=1 - m)

    def state(self, teacher: Teacher) -> dict:
        return {"teacher": "ema"}

    def tensors(self, teacher: Teacher) -> dict[str, torch.Tensor]:
        """The teacher's weights: they are trained state, kept with the checkpoint."""
        return {k: v.detach().float().cpu().contiguous() for k, v in teacher.encoder.state_dict().items()}

    def restore(self, teacher: Teacher, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        teacher.encoder.load_state_dict(tensors)


def build_policy(cfg: RunConfig, source: Callable[[int], TeacherWeights], dtype: torch.dtype):
    if cfg.teacher.update == "breakpoint":
        return BreakpointPolicy(cfg, source, dtype)
    return EmaPolicy(cfg, bf16=dtype == torch.bfloat16)
