"""One training loop for pre-training and fine-tuning; what differs is the task (method/tasks.py).

The loop owns everything the two share: the lr schedule (linear warm-up, cosine to min_lr), the
per-micro-step seeding (torch's, numpy's and python's generators from (seed, stage, step,
micro-step, rank): a resumed run replays every random draw), the accumulation boundary, the loss
window and the log lines (loss, lr, grad norm, skipped steps, images/s, data wait), evaluation at
epoch ends, the divergence guard, the stop poll (preemption), checkpoint cadence, resume (also on
another number of ranks or workers) and the profiler window. The loader (data/loader.py) hands it
device-ready micro-batches from any step on; the task computes the loss; the engine (DeepSpeed,
or the benchmark's plain loop) does backward and step. There is no host synchronisation in a
step: the loss is summed on the device and read once per log line.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dbot_ds.config import ConfigError, TrainingConfig
from dbot_ds.errors import UserError
from dbot_ds.method.stages import StagePlan
from dbot_ds.method.tasks import no_phases
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime.engine import gather, set_lr, weights_finite
from dbot_ds.runtime.metrics import LossWindow
from dbot_ds.runtime.profiling import StepProfiler, profiled
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


class Diverged(UserError):
    """The run diverged: no export is written from it."""
    exit_code = 3


class _RolledBack(Exception):
    def __init__(self, step: int):
        self.step = step


class Trainer:
    def __init__(self, task, engine, loader, *, cfg: TrainingConfig, run: RunDir, session: Session,
                 plan: StagePlan, stage: int = 1):
        self.task, self.engine, self.loader = task, engine, loader
        self.cfg, self.run, self.plan, self.stage = cfg, run, plan, stage
        self.world, self.stop, self.log = session.world, session.stop, session.log
        self.accum = loader.accum
        self.data_skip = 0  # optimizer steps of data passed over after rollbacks
        self.rollbacks = 0
        self.last_good: Path | None = None  # this stage's newest checkpoint: resumed from or saved
        # the layouts (ranks, workers, steps) that read the first steps of data epoch
        # `layouts_epoch` before this run's (a resume with other numbers of ranks or workers)
        self.layouts, self.layouts_epoch = [], -1

    @property
    def total(self) -> int:
        return self.plan.steps(self.stage)

    def resume(self, ckpt: Path) -> int:
        """Weights, optimizer state and the task's state from `ckpt`; returns its step."""
        state = checkpoint.load(self.engine, ckpt)
        self.last_good = Path(ckpt)
        try:
            self.task.restore(state, checkpoint.load_tensors(ckpt))
        except ConfigError as e:
            raise ConfigError(f"cannot resume from {ckpt}: {e}") from e
        self.data_skip, self.rollbacks = state.get("data_skip", 0), state.get("rollbacks", 0)
        self.layouts_epoch, in_epoch = divmod(state["step"] + self.data_skip, self.loader.steps_per_epoch)
        self.layouts = [list(e) for e in state.get("layouts", [])] if in_epoch else []
        saved = [state["world_size"], state.get("num_workers", self.loader.workers)]
        if in_epoch and saved != [self.world.size, self.loader.workers]:  # the saved run's part of the epoch
            self.layouts.append([*saved, in_epoch - sum(e[2] for e in self.layouts)])
        return state["step"]

    def save(self, step: int) -> None:
        state = {"stage": self.stage, "step": step, "global_step": self.plan.global_step(self.stage, step),
                 "world_size": self.world.size, "zero_stage": self.engine.zero_optimization_stage(),
                 "data_skip": self.data_skip, "rollbacks": self.rollbacks, "num_workers": self.loader.workers,
                 "layouts": self.layouts if self.data_epoch(step) == self.layouts_epoch else [],
                 "config": self.cfg.to_dict(), **self.task.state()}
        self.last_good = checkpoint.save(self.engine, self.run.checkpoints, state, is_main=self.world.is_main,
                                         keep=self.cfg.checkpoint.keep, tensors=self.task.tensors())

    def fit(self, step: int = 0) -> Outcome:
        """Train from optimizer step `step` to the stage's end, a stop request or stop_at_step;
        after a rollback (divergence.policy=rollback), from the checkpoint it went back to."""
        while True:
            try:
                return self._fit(step)
            except _RolledBack as back:
                step = back.step

    def _fit(self, step: int) -> Outcome:
        cfg, total = self.cfg, self.total
        warmup = round(cfg.optim.warmup_epochs * self.loader.steps_per_epoch)
        window = LossWindow(self.engine.device, step, skipped_steps(self.engine))
        profiler = StepProfiler(cfg.profile.window(), cfg.profile.memory, self.run.profile, self.world.rank,
                                self.engine.device)
        bar = tqdm(total=total, initial=step, desc=f"{self.task.name} stage {self.stage}/{self.plan.num_stages}",
                   disable=not self.world.is_main, dynamic_ncols=True)
        earlier = self.layouts if self.data_epoch(step) == self.layouts_epoch else []
        try:
            with profiled(profiler):
                waited = time.perf_counter()
                for at, micro, batch in self.loader.batches(step, total, offset=self.data_skip, earlier=earlier):
                    window.data_wait += time.perf_counter() - waited
                    if micro == 0:  # once per optimizer step
                        profiler.before(self.plan.global_step(self.stage, at))
                        lr = lr_at(at, total, warmup, cfg.peak_lr(), cfg.optim.min_lr)
                        set_lr(self.engine, lr)
                    seed_everything(derive_seed(cfg.seed, "step", self.stage, at, micro, self.world.rank))
                    window.add(micro_step(self.task, self.engine, batch, profiler.phases() or no_phases))
                    if micro == self.accum - 1:
                        step = at + 1
                        profiler.after(self.plan.global_step(self.stage, step))
                        outcome = self.after_step(step, lr, window, bar)
                        if outcome is not None:
                            return outcome
                    waited = time.perf_counter()
        finally:
            bar.close()
        return Outcome(step, step == total, False, self.stop_requested(step))

    def after_step(self, step: int, lr: float, window: LossWindow, bar) -> Outcome | None:
        """After optimizer step `step`: the task's update, the stop poll, evaluation, the health
        check, the log line and the checkpoint; an Outcome when the loop stops here."""
        cfg, total, spe = self.cfg, self.total, self.loader.steps_per_epoch
        self.task.after_step(self.engine, step, total, gather(self.engine))
        bar.update(1)
        preempted = step % PREEMPT_POLL_EVERY == 0 and self.stop.poll()
        asked_to_stop = self.stop_requested(step)
        stopping = preempted or asked_to_stop
        # evaluated at epoch ends, at the end and at stop_at_step (a preempted job has no time)
        evaluation = self.task.evaluate(self.engine) if step % spe == 0 or step == total or asked_to_stop else None
        logging = evaluation is not None or step % cfg.log_every == 0 or step == total
        saving = stopping or step == total or step % (cfg.checkpoint.every_steps or spe) == 0
        if logging or saving:  # a host sync here already: check the run's health first
            loss, skipped = window.mean(self.world.size), skipped_steps(self.engine) - window.skipped_at_start
            # weights are checked before they are saved: an optimizer that never skips a step
            # (fp32 without loss scaling) applies a non-finite gradient under a finite loss
            sick = self.sickness(loss, skipped, weights=saving)
            if sick:
                return self.diverged(step, sick, window.step, preempted)
        if logging:
            self.record(bar, step, lr, loss, skipped, window, evaluation or {})
            window.restart(step, skipped_steps(self.engine))
        if saving:
            self.save(step)
        if stopping:
            if preempted and self.world.is_main:
                print(f"preempted: checkpoint saved at stage {self.stage} step {step}", flush=True)
            return Outcome(step, step == total, preempted, True)
        return None

    def sickness(self, loss: float, skipped: int, weights: bool) -> str | None:
        """What is wrong with the run since the last log line, or None. The same on every rank
        (reduced values): every rank takes the same branch after it."""
        limit = self.cfg.divergence.max_skipped_steps
        if not math.isfinite(loss):
            return f"loss {loss}"
        if skipped > limit:
            return f"{skipped} optimizer steps skipped (non-finite gradients), more than divergence.max_skipped_steps {limit}"
        if weights and not weights_finite(self.engine):
            return "non-finite weights"
        return None

    def diverged(self, step: int, what: str, since: int, preempted: bool) -> Outcome:
        """Roll back to the last good checkpoint (divergence.policy=rollback, within
        max_rollbacks), or stop with Diverged. A preempted job writes nothing and stops: its
        requeued self resumes from the last good checkpoint."""
        where, good, policy = f"stage {self.stage} steps {since}..{step}", self.last_good, self.cfg.divergence
        if policy.policy == "rollback" and good is not None and self.rollbacks < policy.max_rollbacks:
            if preempted:
                if self.world.is_main:
                    print(f"diverged at {where} ({what}) as the job was preempted: nothing saved; "
                          f"the requeued job resumes from {good}", flush=True)
                return Outcome(step, False, True, True)
            rollbacks, skip = self.rollbacks, self.data_skip  # this run's counts, not the checkpoint's
            resumed = self.resume(good)
            self.rollbacks = rollbacks + 1
            self.data_skip = skip + step - resumed  # go on past the data that diverged
            if self.world.is_main:
                print(f"diverged at {where} ({what}): rollback {self.rollbacks}/{policy.max_rollbacks} to {good}, "
                      f"passing over {step - resumed} steps of data", flush=True)
            raise _RolledBack(resumed)
        if policy.policy == "rollback":
            why = f" after {self.rollbacks} rollbacks" if good is not None else ", with no checkpoint of this stage to go back to"
        else:
            why = ""
        hint = ("resume from it with --set divergence.policy=rollback, or start a new --out with a lower lr"
                if good is not None else "lower the lr (optim.lr or optim.base_lr) or lengthen the warm-up")
        raise Diverged(f"training diverged at {where}: {what}{why}; no export was written. Last good checkpoint: "
                       f"{good or 'none'}: {hint}")

    def data_epoch(self, step: int) -> int:
        """The epoch of the data step `step` reads (an epoch that ended at `step` counts as past)."""
        return (step + self.data_skip) // self.loader.steps_per_epoch

    def stop_requested(self, step: int) -> bool:
        return bool(self.cfg.stop_at_step) and self.plan.global_step(self.stage, step) >= self.cfg.stop_at_step

    def record(self, bar, step: int, lr: float, loss: float, skipped: int, window: LossWindow,
               evaluation: dict) -> None:
        grad_norm = self.engine.get_global_grad_norm()
        record = {"stage": self.stage, "epoch": step / self.loader.steps_per_epoch, "step": step,
                  "global_step": self.plan.global_step(self.stage, step), "loss": loss, "lr": lr,
                  "grad_norm": None if grad_norm is None else float(grad_norm), "skipped_steps": skipped,
                  "images_per_s": window.steps_per_s(step) * self.cfg.batch.global_batch,
                  "data_wait_s": window.data_wait_per_step(step), **evaluation}
        self.log.log(record, record["global_step"])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                        **({"top1": f"{100 * evaluation['top1']:.1f}"} if "top1" in evaluation else {}))


def skipped_steps(engine) -> int:
    """Optimizer steps DeepSpeed skipped so far (non-finite gradients): the same on every rank."""
    return engine.skipped_steps
