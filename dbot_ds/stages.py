"""Stage bookkeeping: which teacher and which student each stage starts with.

Stage numbers are 1-based everywhere (directories, meta.json, logs). At each breakpoint the
student is exported to <run>/stage<k>/, and stage k+1's teacher is built from exactly that
export; the student restarts from a seed that depends only on (run seed, stage), so every rank
re-initialises it identically.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from dbot_ds.config import RunConfig
from dbot_ds.export import ExportError, read_export, state_sha256
from dbot_ds.seeding import derive_seed
from dbot_ds.student import Student
from dbot_ds.files import file_sha256
from dbot_ds.input_norms import STUDENT_NORM
from dbot_ds.teacher import (Teacher, TeacherWeights, check_fits, encoder_from_export, random_encoder,
                             random_teacher_arch)
from dbot_ds.teacher_import import import_teacher, resize_grid


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


def export_dir(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"stage{stage}"


def export_meta(cfg: RunConfig, *, stage: int, steps: int, teacher_sha256: str, target_width: int,
                **extra) -> dict:
    """meta.json of a stage export: everything needed to rebuild the student (and its encoder,
    the next stage's teacher) with no other input."""
    decoder = cfg.model.decoder_arch()
    return {"stage": stage, "recipe": cfg.recipe, "steps": steps, "teacher_sha256": teacher_sha256,
            "encoder": cfg.model.encoder_arch().to_dict(), "decoder": decoder.to_dict() if decoder else None,
            "target_width": target_width, "drop_path": cfg.model.resolved_drop_path(),
            "input_norm": STUDENT_NORM,  # what its images were normalised with, as a teacher sees them
            "config": cfg.to_dict(), **extra}


def build_teacher(cfg: RunConfig, weights: TeacherWeights, dtype: torch.dtype, **kw) -> Teacher:
    """The Teacher the run config asks for around checked weights: target layer, projection,
    per-token normalisation, and the input normalisation of the weights (or the config's)."""
    norm = weights.input_norm if cfg.teacher.input_norm == "auto" else cfg.teacher.input_norm
    return Teacher(weights.encoder, weights.identity, final_norm=cfg.teacher.final_norm,
                   project=cfg.teacher.project, normalize=cfg.teacher.normalize_target,
                   input_norm=norm, dtype=dtype, **kw)


def initial_teacher_encoder(cfg: RunConfig, verbose: bool = True) -> TeacherWeights:
    """Stage 1's teacher. A pretrained teacher (a dbot-ds export, or a timm / DINO / MAE / CLIP
    weights file) is read, checked and put on the student's token grid."""
    student_arch = cfg.model.encoder_arch()
    if cfg.teacher.init == "random":
        encoder = random_encoder(random_teacher_arch(student_arch, cfg.teacher.random_depth),
                                 derive_seed(cfg.seed, "random-teacher"))
        return TeacherWeights(encoder, state_sha256(encoder.state_dict()), STUDENT_NORM)
    source = Path(cfg.teacher.init)
    if source.is_dir() or not source.exists():
        encoder, meta = encoder_from_export(source)
        identity, report = meta["sha256"], {"layout": "dbot-ds export",
                                            "input_norm": meta.get("input_norm", STUDENT_NORM)}
    else:
        encoder, report = import_teacher(source, cfg.teacher.heads)
        identity = file_sha256(source)
    check_fits(encoder.arch, student_arch, str(source))
    encoder, resized = resize_grid(encoder, student_arch.grid)
    if verbose:
        print(f"teacher {source}: {report['layout']}, {encoder.arch.width} wide, {encoder.arch.depth} deep, "
              f"patch {encoder.arch.patch_size}; mapped {report.get('mapped', 'all')} tensors, "
              f"converted {report.get('converted', 0)}, ignored {report.get('ignored', [])}; "
              f"input normalisation {report['input_norm']}"
              + (f" (run config: {cfg.teacher.input_norm})" if cfg.teacher.input_norm != "auto" else "")
              + (f"; output projection to {encoder.arch.proj_dim}" if encoder.arch.proj_dim else "")
              + (f"; interpolated {resized}" if resized else ""), flush=True)
    return TeacherWeights(encoder, identity, report["input_norm"])


def previous_stage_encoder(cfg: RunConfig, run_dir: Path, stage: int) -> TeacherWeights:
    """Stage k > 1's teacher: stage k-1's export, verified by sha256 and checked against the
    student's grid."""
    source = export_dir(run_dir, stage - 1)
    try:
        encoder, meta = encoder_from_export(source)
    except ExportError as e:
        raise ExportError(f"stage {stage} needs stage {stage - 1}'s export as its teacher: {e}") from e
    check_fits(encoder.arch, cfg.model.encoder_arch(), f"of stage {stage} ({source})")
    return TeacherWeights(encoder, meta["sha256"], meta.get("input_norm", STUDENT_NORM))


def breakpoint_teacher(cfg: RunConfig, run_dir: Path, stage: int, dtype: torch.dtype,
                       checked: TeacherWeights | None = None) -> Teacher:
    """Stage 1: random or pretrained; stage k > 1: the export of stage k-1, verified by sha256.
    checked: this stage's teacher when already read and checked before the run."""
    if checked is None:
        checked = initial_teacher_encoder(cfg) if stage == 1 else previous_stage_encoder(cfg, run_dir, stage)
    return build_teacher(cfg, checked, dtype)


def ema_teacher(cfg: RunConfig, student: Student, bf16: bool) -> Teacher:
    """A momentum teacher starts as a copy of the student's encoder and keeps fp32 weights."""
    weights = TeacherWeights(copy.deepcopy(student.encoder), "ema", STUDENT_NORM)
    return build_teacher(cfg, weights, torch.float32, autocast=torch.bfloat16 if bf16 else None)


def fresh_student(cfg: RunConfig, stage: int, target_width: int) -> Student:
    """Built from (seed, stage) alone, with the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "student", stage))
        return Student(cfg.model.encoder_arch(), cfg.model.decoder_arch(), target_width,
                       cfg.model.resolved_drop_path())


def stage_student(cfg: RunConfig, run_dir: Path, stage: int, target_width: int) -> Student:
    student = fresh_student(cfg, stage, target_width)
    if stage == 1 or cfg.teacher.reinit_student:
        return student
    # Ablation "student re-init off": keep the weights of the previous stage's student.
    state, _ = read_export(export_dir(run_dir, stage - 1))
    own = student.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if set(own) - set(kept) - {k for k in own if k.startswith("head.")}:
        raise ExportError(f"stage {stage - 1}'s export does not fit the student: "
                          f"missing {sorted(set(own) - set(kept))}")
    student.load_state_dict(kept, strict=False)  # a head of another width starts fresh
    return student
