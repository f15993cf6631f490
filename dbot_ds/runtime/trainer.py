"""One training loop for pre-training and fine-tuning; what differs is the task (method/tasks.py).

The loop owns everything the two share: the lr schedule (linear warm-up, cosine to min_lr), the
per-micro-step seeding (torch's, numpy's and python's generators from (seed, task, stage, step,
micro-step, rank): a resumed run replays every random draw), the accumulation boundary, the loss
window and the log lines, evaluation at epoch ends, the stop poll (preemption), checkpoint
cadence and resume. The loader (data/loader.py) hands it device-ready micro-batches from any
step on; the task computes the loss; the engine (DeepSpeed, or the benchmark's plain loop)
does backward and step. There is no host synchronisation in a step: the loss is summed on the
device and read once per log line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from dbot_ds.config import TrainingConfig
from dbot_ds.method.stages import StagePlan
from dbot_ds.method.tasks import no_phases
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime.engine import gather, set_lr
from dbot_ds.runtime.metrics import LossWindow
from dbot_ds.runtime.schedule import lr_at
from dbot_ds.runtime.session import Session
from dbot_ds.seeding import derive_seed, seed_everything
from dbot_ds.weights.rundir import RunDir

PREEMPT_POLL_EVERY = 5  # optimizer steps between stop checks (decided one poll later)


def micro_step(task, engine, batch, phases=no_phases) -> torch.Tensor:
    """One micro-batch through the task, backward, (optimizer) step. Returns the loss as a
    device tensor: no host synchronisation here."""
    loss = task.loss(engine, batch, phases)
    with phases("backward"):
        engine.backward(loss)
    with phases("optimizer"):
        engine.step()
    return loss.detach()


@dataclasses.dataclass(frozen=True)
class Outcome:
    step: int
    finished: bool   # the stage's last step is done
    preempted: bool  # a stop signal: checkpointed, to be resumed
    stopped: bool    # stop_at_step (or preempted): checkpointed, nothing after this

    @property
    def go_on(self) -> bool:
        return self.finished and not self.stopped


def find_resume(run: RunDir, resume: str, cfg: TrainingConfig, only_stage: int | None = None) -> Path | None:
    """The checkpoint to resume from ('auto': the newest complete one; 'none'; or a path), its
    config checked against this run's (only cfg.MAY_CHANGE may differ)."""
    if resume == "none":
        return None
    if resume != "auto":
        ckpt = Path(resume)
    elif only_stage is None:
        ckpt = checkpoint.latest(run.checkpoints)
    else:  # a single-stage job resumes only from its own stage's checkpoints
        own = checkpoint.stage_checkpoints(run.checkpoints, only_stage)
        ckpt = own[-1] if own else None
    if ckpt is not None:
        checkpoint.check_same_config(ckpt, cfg.to_dict(), cfg.MAY_CHANGE)
    return ckpt


class Trainer:
    def __init__(self, task, engine, loader, *, cfg: TrainingConfig, run: RunDir, session: Session,
                 plan: StagePlan, stage: int = 1):
        self.task, self.engine, self.loader = task, engine, loader
        self.cfg, self.run, self.plan, self.stage = cfg, run, plan, stage
        self.world, self.stop, self.log = session.world, session.stop, session.log
        self.accum = loader.accum

    @property
    def total(self) -> int:
        return self.plan.steps(self.stage)

    def resume(self, ckpt: Path) -> int:
        """Weights, optimizer state and the task's state from `ckpt`; returns its step."""
        state = checkpoint.load(self.engine, ckpt)
        self.task.restore(state, ckpt)
        return state["step"]

    def save(self, step: int) -> None:
        state = {"stage": self.stage, "step": step, "global_step": self.plan.global_step(self.stage, step),
                 "world_size": self.world.size, "zero_stage": self.engine.zero_optimization_stage(),
                 "config": self.cfg.to_dict(), **self.task.state()}
        checkpoint.save(self.engine, self.run.checkpoints, state, is_main=self.world.is_main,
                        keep=self.cfg.checkpoint.keep, write_extra=self.task.save)

    def fit(self, step: int = 0) -> Outcome:
        """Train from optimizer step `step` to the stage's end, a stop request or stop_at_step."""
        cfg, spe, total = self.cfg, self.loader.steps_per_epoch, self.total
        warmup, peak = round(cfg.optim.warmup_epochs * spe), cfg.peak_lr()
        every = cfg.checkpoint.every_steps or spe
        window, preempted = LossWindow(self.engine.device, step), False
        bar = tqdm(total=total, initial=step, desc=f"{self.task.name} stage {self.stage}/{self.plan.num_stages}",
                   disable=not self.world.is_main, dynamic_ncols=True)
        try:
            for at, micro, batch in self.loader.batches(step, total):
                lr = lr_at(at, total, warmup, peak, cfg.optim.min_lr)
                set_lr(self.engine, lr)
                seed_everything(derive_seed(cfg.seed, self.task.name, self.stage, at, micro, self.world.rank))
                window.add(micro_step(self.task, self.engine, batch))
                if micro < self.accum - 1:
                    continue
                step = at + 1
                self.task.after_step(self.engine, step, total, gather(self.engine))
                bar.update(1)
                if step % PREEMPT_POLL_EVERY == 0 and self.stop.poll():
                    preempted = True
                stopping = preempted or self.stop_requested(step)
                evaluation = self.task.evaluate(self.engine) if step % spe == 0 or step == total else None
                if evaluation is not None or step % cfg.log_every == 0 or step == total:
                    self.record(bar, step, lr, window, evaluation or {})
                if stopping or step == total or step % every == 0:
                    self.save(step)
                if stopping:
                    if preempted and self.world.is_main:
                        print(f"preempted: checkpoint saved at stage {self.stage} step {step}", flush=True)
                    return Outcome(step, step == total, preempted, True)
        finally:
            bar.close()
        return Outcome(step, step == total, False, self.stop_requested(step))

    def stop_requested(self, step: int) -> bool:
        return bool(self.cfg.stop_at_step) and self.plan.global_step(self.stage, step) >= self.cfg.stop_at_step

    def record(self, bar, step: int, lr: float, window: LossWindow, evaluation: dict) -> None:
        loss, steps_per_s = window.close(step, self.world.size)
        record = {"stage": self.stage, "epoch": step / self.loader.steps_per_epoch, "step": step,
                  "global_step": self.plan.global_step(self.stage, step), "loss": loss, "lr": lr,
                  "images_per_s": steps_per_s * self.cfg.batch.global_batch, **evaluation}
        self.log.log(record, record["global_step"])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                        **({"top1": f"{100 * evaluation['top1']:.1f}"} if "top1" in evaluation else {}))
