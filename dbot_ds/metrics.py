"""Rank-0 metrics: a JSON-lines log and TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path


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
