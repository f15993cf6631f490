"""Rank-0 metrics: a JSON-lines log and TensorBoard scalars; the loss window between log lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist


class LossWindow:
    """Micro-batch losses summed on the device between log lines: reading the mean is the
    loop's only host synchronisation, once per log interval."""

    def __init__(self, device: torch.device, step: int):
        self.device = device
        self.restart(step)

    def restart(self, step: int) -> None:
        self.loss_sum, self.count = torch.zeros((), device=self.device), 0
        self.step, self.time = step, time.time()

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.count += 1

    def mean(self, world_size: int) -> float:
        """The mean loss over every rank's micro-batches since the window opened (one all-reduce
        and one host read; non-finite on every rank if it is on one)."""
        total = self.loss_sum.clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        return total.item() / (max(self.count, 1) * world_size)

    def steps_per_s(self, step: int) -> float:
        return (step - self.step) / max(time.time() - self.time, 1e-9)


class MetricsLog:
    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.file = open(out / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(out / "tb"))

    def log(self, record: dict, global_step: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if isinstance(v, float):
                self.tb.add_scalar(f"train/{k}", v, global_step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
