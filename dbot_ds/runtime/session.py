"""A training process, set up the same way for every training command: its place in the world,
its device, the run directory's lock, the filled DeepSpeed config (written next to the run's
config), the stop signal (preemption) and the metrics log."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import torch

from dbot_ds.config import ConfigError, TrainingConfig
from dbot_ds.runtime import lock
from dbot_ds.runtime.distributed import World, from_rank0, world_from_env
from dbot_ds.runtime.ds_config import compute_dtype, resolve_ds_config
from dbot_ds.runtime.engine import init_distributed
from dbot_ds.runtime.metrics import MetricsLog
from dbot_ds.runtime.preemption import StopSignal
from dbot_ds.weights.rundir import RunDir


@dataclasses.dataclass
class Session:
    world: World
    device: torch.device
    ds_config: dict
    stop: StopSignal
    log: MetricsLog

    @property
    def dtype(self) -> torch.dtype:
        """What the engine's module computes in (bf16 when the DeepSpeed JSON enables it)."""
        return compute_dtype(self.ds_config)

    @property
    def accum(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]


def agree(failure: str | None, error=ConfigError) -> None:
    """Rank 0's failure (a one-line message, or None) stops every rank, not only rank 0."""
    failure = from_rank0(failure)
    if failure:
        raise error(failure)


def take_lock(run: RunDir, world: World) -> None:
    """Rank 0 takes the run directory's lock; every rank stops if it could not."""
    refused = None
    if world.is_main:
        try:
            took_over = lock.acquire(run.lock)
            if took_over:
                print(f"took over the stale lock of {run.root}: {took_over}", flush=True)
        except lock.RunLocked as e:
            refused = str(e)
        except OSError as e:
            refused = f"cannot take the lock {run.lock}: {e.strerror or e}; check that {run.root} is writable"
    agree(refused, lock.RunLocked)


def set_aside_earlier_run(run: RunDir) -> Path | None:
    """A run started afresh in a used directory takes nothing of the run before it for its own
    (its newest checkpoint resumed, its W&B run continued, its exports in the way of the new
    ones): everything the earlier run wrote moves, under its own names, to <run>/earlier/<n>/."""
    outputs = run.outputs()
    if not outputs:
        return None
    n = 1
    while (run.earlier / str(n)).exists():
        n += 1
    aside = run.earlier / str(n)
    aside.mkdir(parents=True)
    for p in outputs:
        p.rename(aside / p.name)
    return aside


@contextlib.contextmanager
def start_session(cfg: TrainingConfig, run: RunDir, fresh: bool) -> Iterator[Session]:
    """Batch arithmetic and DeepSpeed JSON conflicts fail before the process group starts; the
    resolved configs are written once the run directory's lock is ours. `fresh`: the run starts
    from nothing (no checkpoint, no earlier stage)."""
    world = world_from_env()
    ds_config = resolve_ds_config(cfg, world.size)
    device = init_distributed(world)
    take_lock(run, world)
    try:
        failed = None
        try:  # rank 0 alone writes here: what fails must stop the other ranks too, not hang them
            if world.is_main:
                aside = set_aside_earlier_run(run) if fresh else None
                if aside:
                    print(f"started afresh: the earlier run's files are in {aside}", flush=True)
                run.write_configs(cfg.to_dict(), ds_config)
            log = MetricsLog(run, world.is_main, cfg.log.wandb, cfg.to_dict())
        except ConfigError as e:  # W&B could not start
            failed = str(e)
        except OSError as e:
            failed = f"cannot write the run directory {run.root}: {e.strerror or e} ({e.filename or ''})"
        agree(failed)
        session = Session(world, device, ds_config, StopSignal(device), log)
        ended = False
        try:
            yield session
            ended = True
        finally:
            session.log.close(failed=not ended)
            session.stop.close()
    finally:
        if world.is_main:
            lock.release(run.lock)
