"""`dbot-ds pretrain`: K stages of masked knowledge distillation, a breakpoint between stages,
resumable anywhere.

Launch (every launcher sets RANK/WORLD_SIZE/LOCAL_RANK; a bare command runs 1 process):
    dbot-ds pretrain --recipe demo --out runs/demo
    torchrun --nproc_per_node 8 -m dbot_ds.cli pretrain --recipe vit_base --out runs/b --set data.shards=M
    deepspeed --num_gpus 8 --module dbot_ds.cli pretrain --recipe vit_base --out runs/b --set data.shards=M

Each stage: the teacher policy gives the teacher, a fresh student (from (seed, stage)) in a fresh
engine (new optimizer, schedule restarted), the Trainer runs the DistillTask, and the stage's
student is exported (the next stage's teacher).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

from dbot_ds.config import ConfigError, RunConfig, load_config
from dbot_ds.data.loader import ResumableLoader, pretrain_loader
from dbot_ds.method.policies import build_policy
from dbot_ds.method.stages import StagePlan, fresh_student, keep_weights
from dbot_ds.method.tasks import DistillTask
from dbot_ds.method.teacher import TeacherWeights
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime import engine as ds_engine
from dbot_ds.runtime.accel import apply_fast_paths
from dbot_ds.runtime.distributed import barrier, world_from_env
from dbot_ds.runtime.session import Session, start_session
from dbot_ds.runtime.trainer import Trainer, find_resume
from dbot_ds.weights.export import META, read_export, stage_meta, write_export
from dbot_ds.weights.rundir import RunDir
from dbot_ds.weights.sources import stage_teacher


def finished_stage(cfg: RunConfig, run: RunDir, stage: int) -> Path | None:
    """For a single-stage job: the stage's export (verified) if the stage is done already."""
    if not 1 <= stage <= len(cfg.stages.epochs):
        raise ConfigError(f"--stage {stage}: the run has stages 1..{len(cfg.stages.epochs)}")
    done = run.export(stage)
    if (done / META).is_file():
        read_export(done)  # verifies the sha256
        return done
    return None


def generated_shards(cfg: RunConfig, run: RunDir, is_main: bool) -> str | None:
    """data.source=generated_shards: the run's generated JPEG shards, written once by rank 0."""
    if cfg.data.source != "generated_shards":
        return None
    from dbot_ds.data.generated import generated_shards as write
    from dbot_ds.data.loader import generated_size

    manifest = run.data / "shards" / "manifest.json"
    if is_main and not manifest.is_file():
        write(manifest.parent, cfg.data.synthetic_images, cfg.seed, "shapes", generated_size(cfg))
    barrier()
    return str(manifest)


def stage_student(cfg: RunConfig, run: RunDir, stage: int, target_width: int):
    student = fresh_student(cfg, stage, target_width)
    if stage > 1 and not cfg.teacher.reinit_student:  # ablation: the previous stage's student
        keep_weights(student, read_export(run.export(stage - 1))[0], stage)
    return student


@dataclasses.dataclass
class Pretraining:
    """A pre-training run's parts that every stage shares."""
    cfg: RunConfig
    run: RunDir
    session: Session
    loader: ResumableLoader
    plan: StagePlan
    policy: object

    def start(self, stage: int, ckpt: Path | None = None) -> tuple[DistillTask, object]:
        """Stage `stage`'s task (its teacher from the policy) and a fresh engine around a fresh
        student (new optimizer; the schedule restarts with the Trainer), ready to load `ckpt`."""
        cfg, s = self.cfg, self.session
        teacher, student = self.policy.start(stage, lambda width: stage_student(cfg, self.run, stage, width))
        if not ds_engine.replicas_identical(student):
            raise RuntimeError(f"stage {stage}: the re-initialised student differs between ranks")
        teacher = teacher.to(s.device)
        engine = ds_engine.build_engine(student, cfg, checkpoint.resume_ds_config(s.ds_config, ckpt, s.world.size),
                                        s.device)
        task = DistillTask(cfg, teacher, self.policy)
        apply_fast_paths(cfg.compile, cfg.cuda_graph_teacher, teacher, engine.module, *task.examples(s.device, s.dtype))
        return task, engine

    def trainer(self, task: DistillTask, engine, stage: int) -> Trainer:
        return Trainer(task, engine, self.loader, cfg=self.cfg, run=self.run, session=self.session,
                       plan=self.plan, stage=stage)

    def stage(self, stage: int, ckpt: Path | None):
        """Stage `stage` from its start or from `ckpt`, and its export when it is done.
        -> (outcome, export or None)."""
        task, engine = self.start(stage, ckpt)
        trainer = self.trainer(task, engine, stage)
        outcome = trainer.fit(trainer.resume(ckpt) if ckpt else 0)
        export = self.export(engine, stage, task.teacher.identity) if outcome.finished else None
        engine.destroy()
        return outcome, export

    def export(self, engine, stage: int, teacher_identity: str) -> Path:
        """The stage's student as an export (collective under ZeRO-3; rank 0 writes)."""
        state = ds_engine.full_fp32_state(engine)
        state.update(engine.module.fixed_buffers())
        path = self.run.export(stage)
        if self.session.world.is_main:
            write_export(path, state, stage_meta(self.cfg, stage=stage, steps=self.plan.steps(stage),
                                                 teacher_sha256=teacher_identity,
                                                 target_width=engine.module.head.out_features))
        barrier()
        return path


@contextlib.contextmanager
def pretraining(cfg: RunConfig, run: RunDir, teachers: dict[int, TeacherWeights] | None = None,
                fresh: bool = False) -> Iterator[Pretraining]:
    """The session, loader, stage plan and teacher policy of a run; `teachers` holds stage
    teachers read and checked already (each is used once); `fresh`: the run starts at stage 1
    with no checkpoint, and what an earlier run left in `run` is set aside first (off unless
    asked: it moves exports)."""
    teachers = {} if teachers is None else teachers
    with start_session(cfg, run, fresh) as s:
        loader = pretrain_loader(cfg, rank=s.world.rank, world=s.world.size, accum=s.accum, device=s.device,
                                 dtype=s.dtype, shards=generated_shards(cfg, run, s.world.is_main))
        policy = build_policy(cfg, lambda k: teachers.pop(k, None) or stage_teacher(cfg, run, k), s.dtype)
        yield Pretraining(cfg, run, s, loader, StagePlan(tuple(cfg.stages.epochs), loader.steps_per_epoch), policy)


def pretrain(cfg: RunConfig, out: str | Path, resume: str = "auto", only_stage: int | None = None) -> list[Path]:
    """Run (or continue) every stage, or only `only_stage` (one Slurm job per stage); returns
    the stage exports written so far."""
    run = RunDir(out)
    if only_stage is not None and (done := finished_stage(cfg, run, only_stage)):
        return [done]
    ckpt = find_resume(run, resume, cfg, only_stage)
    first = checkpoint.read_state(ckpt)["stage"] if ckpt else (only_stage or 1)
    teachers: dict[int, TeacherWeights] = {}  # the first stage's, read and checked before anything starts
    if cfg.teacher.update == "breakpoint":  # (an EMA teacher comes from the student)
        teachers[first] = stage_teacher(cfg, run, first, verbose=world_from_env().is_main)
    with pretraining(cfg, run, teachers, fresh=ckpt is None and first == 1) as job:
        exports = [] if only_stage else [run.export(k) for k in range(1, first)]
        for stage in range(first, (only_stage or job.plan.num_stages) + 1):
            outcome, export = job.stage(stage, ckpt if stage == first else None)
            exports += [export] if export else []
            if not outcome.go_on:
                break
    return exports


def main(args) -> int:
    cfg = load_config(args.recipe, args.config, args.set)
    exports = pretrain(cfg, args.out, resume=args.resume, only_stage=args.stage)
    ds_engine.shutdown_distributed()  # on success only: after a failure on one rank a barrier would hang
    if world_from_env().is_main:
        for path in exports:
            print(f"stage export: {path}")
    return 0


def add_config_args(p) -> None:
    p.add_argument("--recipe", help="a named recipe (see `dbot-ds recipes`); default: the paper's "
                   "defaults (ViT-B/16, 2 x 800 epochs)")
    p.add_argument("--config", help="a JSON run config, applied over the recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set mask.ratio=0.8 (repeatable)")


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="dBOT pre-training, all stages (resumable)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (exports, checkpoints, logs)")
    p.add_argument("--resume", default="auto",
                   help="auto: newest complete checkpoint in --out (default); none; or a checkpoint dir")
    p.add_argument("--stage", type=int, help="run only this stage (1-based; a Slurm stage job): its "
                   "teacher must be the previous stage's export; exits at once if the stage is done")
    p.set_defaults(func=main)
