"""A training process, set up the same way for every training command: its place in the world,
its device, the run directory's lock, the filled DeepSpeed config (written next to the run's
config), the stop signal (preemption) and the metrics log."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from dbot_ds.config import TrainingConfig
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
    refused = from_rank0(refused)
    if refused:
        raise lock.RunLocked(refused)


def set_aside_old_metrics(run: RunDir) -> None:
    """A run started afresh in a used directory logs to a metrics.jsonl of its own; the old one
    is kept as metrics.<n>.jsonl."""
    if run.metrics.is_file():
        n = 1
        while run.metrics.with_suffix(f".{n}.jsonl").exists():
            n += 1
        run.metrics.rename(run.metrics.with_suffix(f".{n}.jsonl"))


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
                set_aside_old_metrics(run)
            run.write_configs(cfg.to_dict(), ds_config)
        log = MetricsLog(run.root, world.is_main, cfg.log.wandb, cfg.to_dict())
        session = Session(world, device, ds_config, StopSignal(device), log)
        try:
            yield session
        finally:
            session.log.close()
            session.stop.close()
    finally:
        if world.is_main:
            lock.release(run.lock)
