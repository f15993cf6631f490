"""Rank-0 metrics: a JSON-lines log and TensorBoard scalars; the loss window between log lines."""

from __future__ import annotations

import json
import secrets
import time

import torch

from dbot_ds.config import ConfigError
from dbot_ds.runtime.distributed import all_reduce_sum
from dbot_ds.weights.rundir import RunDir


class LossWindow:
    """What the loop sees between log lines: micro-batch losses summed on the device (reading the
    mean is the loop's only host synchronisation, once per log interval), the host's time spent
    waiting for data, and DeepSpeed's skipped-step count when the window opened."""

    def __init__(self, device: torch.device, step: int, skipped: int = 0):
        self.device = device
        self.restart(step, skipped)

    def restart(self, step: int, skipped: int = 0) -> None:
        self.loss_sum, self.count = torch.zeros((), device=self.device), 0
        self.step, self.time, self.data_wait, self.skipped_at_start = step, time.time(), 0.0, skipped

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.count += 1

    def data_wait_per_step(self, step: int) -> float:
        return self.data_wait / max(step - self.step, 1)

    def mean(self, world_size: int) -> float:
        """The mean loss over every rank's micro-batches since the window opened (one all-reduce
        and one host read; non-finite on every rank if it is on one)."""
        total = self.loss_sum.clone()
        all_reduce_sum(total)
        return total.item() / (max(self.count, 1) * world_size)

    def steps_per_s(self, step: int) -> float:
        return (step - self.step) / max(time.time() - self.time, 1e-9)


class MetricsLog:
    """Rank 0's sinks, every record under the same names in each: <run>/metrics.jsonl,
    TensorBoard in <run>/tb, and Weights & Biases when a project is given (its run id kept in the
    run directory, so a requeued job goes on logging to the same W&B run)."""

    def __init__(self, run: RunDir, enabled: bool, wandb_project: str = "", config: dict | None = None):
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.file = open(run.metrics, "a")
        self.tb = SummaryWriter(str(run.tensorboard))
        if wandb_project:
            self.wandb = start_wandb(run, wandb_project, config or {})

    def log(self, record: dict, global_step: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k, v in numbers.items():
            self.tb.add_scalar(k, v, global_step)
        if self.wandb is not None:
            self.wandb.log({**numbers, "global_step": global_step})

    def close(self, failed: bool = False) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.finish(exit_code=1 if failed else 0)


def start_wandb(run: RunDir, project: str, config: dict):
    """A W&B run for this run directory: a new id the first time, the same id (resume="allow")
    after a requeue or resubmission. WANDB_MODE=offline writes it under <run>/wandb. Its x axis
    is our global_step, not W&B's own step, which drops any record whose step is not above the
    last one (the steps a rollback or a requeue replays)."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("log.wandb needs the wandb package: pip install wandb") from e
    run_id = run.wandb_id.read_text().strip() if run.wandb_id.is_file() else secrets.token_hex(4)
    run.wandb_id.write_text(run_id + "\n")
    try:
        logger = wandb.init(project=project, id=run_id, resume="allow", dir=str(run.root), name=run.root.name,
                            config=config)
    except Exception as e:  # no login, no network: W&B's own errors
        raise ConfigError(f"log.wandb: W&B did not start ({type(e).__name__}: {e}); log in with `wandb login`, "
                          "or run offline with WANDB_MODE=offline and `wandb sync` later") from e
    logger.define_metric("global_step")
    logger.define_metric("*", step_metric="global_step")
    return logger
