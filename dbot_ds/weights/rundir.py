"""A run directory: the one place that knows where a run keeps what.

    <run>/config.json  ds_config.json   the resolved configs
    <run>/metrics.jsonl  tb/            per log interval and evaluation (rank 0), TensorBoard
    <run>/checkpoints/<tag>/            DeepSpeed (ZeRO-sharded) + dbot_state.json
    <run>/checkpoints/latest_complete   pointer to the newest complete checkpoint
    <run>/stage<k>/                     pre-training: stage exports (model.safetensors + meta.json)
    <run>/model.safetensors  metrics.json   fine-tuning: the classifier, its best and last evaluation
    <run>/data/                         generated shards (data.source=generated_shards)
    <run>/logs/                         Slurm job logs (and NCCL flight-recorder dumps)
    <run>/profile/                      torch.profiler traces (profile.steps)
    <run>/.lock                         who is writing the run now (runtime/lock.py)
    <run>/wandb_id  wandb/              the W&B run this directory logs to (log.wandb), its offline files
    <run>/earlier/<n>/                  what an earlier run here wrote, set aside when a run started afresh
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dbot_ds.files import atomic_write


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def model(self) -> Path:
        """A fine-tuning run's classifier (timm key names), written when it ends."""
        return self.root / "model.safetensors"

    @property
    def summary(self) -> Path:
        """A fine-tuning run's best and last evaluation, written when it ends."""
        return self.root / "metrics.json"

    @property
    def earlier(self) -> Path:
        return self.root / "earlier"

    def outputs(self) -> list[Path]:
        """What a run writes here, and a run started afresh must not take for its own: all but
        the generated shards (reusable), the Slurm logs (the job's own, being written), the lock
        and W&B's offline files (each W&B run has its own folder)."""
        stages = sorted(p for p in self.root.glob("stage*") if p.is_dir() and p.name[len("stage"):].isdigit())
        named = [self.config, self.ds_config, self.metrics, self.tensorboard, self.checkpoints, self.wandb_id,
                 self.profile, self.model, self.summary]
        return [p for p in named if p.exists()] + stages

    def export(self, stage: int) -> Path:
        """Pre-training: stage `stage`'s export, the next stage's teacher."""
        return self.root / f"stage{stage}"

    def write_configs(self, config: dict, ds_config: dict) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config, json.dumps(config, indent=2) + "\n")
        atomic_write(self.ds_config, json.dumps(ds_config, indent=2) + "\n")
