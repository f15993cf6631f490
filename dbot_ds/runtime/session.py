"""A training process, set up the same way for every training command: its place in the world,
its device, the filled DeepSpeed config (written next to the run's config), the stop signal
(preemption) and the metrics log."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from dbot_ds.config import TrainingConfig
from dbot_ds.runtime.distributed import World, world_from_env
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


@contextlib.contextmanager
def start_session(cfg: TrainingConfig, run: RunDir) -> Iterator[Session]:
    """Batch arithmetic and DeepSpeed JSON conflicts fail before the process group starts."""
    world = world_from_env()
    ds_config = resolve_ds_config(cfg, world.size)
    device = init_distributed(world)
    if world.is_main:
        run.write_configs(cfg.to_dict(), ds_config)
    session = Session(world, device, ds_config, StopSignal(device), MetricsLog(run.root, world.is_main))
    try:
        yield session
    finally:
        session.log.close()
        session.stop.close()
