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

    def close(self, step: int, world_size: int) -> tuple[float, float]:
        """-> (mean loss over every rank's micro-batches, optimizer steps per second) since the
        window opened; a new window opens at `step`."""
        if dist.is_initialized():
            dist.all_reduce(self.loss_sum)
        loss = self.loss_sum.item() / (self.count * world_size)
        steps_per_s = (step - self.step) / max(time.time() - self.time, 1e-9)
        self.restart(step)
        return loss, steps_per_s


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
