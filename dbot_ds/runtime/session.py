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


def set_aside_earlier_run(run: RunDir) -> None:
    """A run started afresh in a used directory keeps nothing of the run before it where it
    could be taken for its own (its newest checkpoint resumed, its W&B run continued): the
    earlier run's metrics, checkpoints, TensorBoard log and W&B id move to <name>.<n>, the first
    n free for all of them. Stage exports are replaced as the new run writes its own."""
    earlier = [p for p in (run.metrics, run.checkpoints, run.tensorboard, run.wandb_id)
               if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    n = 1
    while any(numbered(p, n).exists() for p in earlier):
        n += 1
    for p in earlier:
        p.rename(numbered(p, n))


def numbered(path: Path, n: int) -> Path:
    """metrics.jsonl -> metrics.<n>.jsonl, checkpoints -> checkpoints.<n>"""
    return path.with_name(f"{path.stem}.{n}{path.suffix}")


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
        if world.is_main:
            if fresh:
                set_aside_earlier_run(run)
            run.write_configs(cfg.to_dict(), ds_config)
        log, failed = None, None
        try:
            log = MetricsLog(run, world.is_main, cfg.log.wandb, cfg.to_dict())
        except ConfigError as e:  # W&B could not start (rank 0)
            failed = str(e)
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
