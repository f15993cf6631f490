"""The DeepSpeed config, filled from the run config (pure: no deepspeed import).

The JSON in ds_configs/ owns ZeRO and precision. Batch sizes, accumulation and clipping come
from the run config; the JSON may leave them out or say "auto", and any other value that
disagrees is an error listing every conflicting key. Optimizer and scheduler live in code.

Two DeepSpeed defaults cost a GPU run and are changed for every config unless its JSON says
otherwise (RUNTIME_DEFAULTS); `zero_optimization.overlap_comm: "auto"` turns the overlap of
gradient reduction with the backward on only where there is communication to overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dbot_ds.config import ConfigError, TrainingConfig
from dbot_ds.files import shipped

DS_CONFIG_DIR = shipped("ds_configs")
RUNTIME_DEFAULTS = {
    # DeepSpeed's throughput timer calls torch.cuda.synchronize() in every forward and step
    # (deepspeed/utils/timer.py, ThroughputTimer with "synchronized": true by default).
    "timers": {"throughput": {"enabled": False}},
    # With bf16 on, DeepSpeed all-reduces gradients in bf16 by default: the fp32-accumulated
    # gradients would be rounded to bf16 on every step.
    "communication_data_type": "fp32",
}


def load_ds_json(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"DeepSpeed config {name_or_path!r} not found (neither a file nor one of "
                          f"ds_configs/: {', '.join(known)})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e


def grad_accumulation(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step:
        fits = [m for m in range(1, global_batch + 1) if global_batch % (m * world_size) == 0]
        raise ConfigError(
            f"impossible batch arithmetic: global_batch {global_batch} is not a multiple of "
            f"micro_batch {micro_batch} x world size {world_size} = {per_step}. "
            f"Micro batches that fit this world size: {fits[-6:] or 'none'} "
            "(--set batch.micro_batch=N), or change batch.global_batch")
    return global_batch // per_step


def resolve_ds_config(cfg: TrainingConfig, world_size: int) -> dict:
    return fill_ds_config(cfg.deepspeed, global_batch=cfg.batch.global_batch, micro_batch=cfg.batch.micro_batch,
                          grad_clip=cfg.optim.grad_clip, world_size=world_size)


def fill_ds_config(name: str, *, global_batch: int, micro_batch: int, grad_clip: float, world_size: int) -> dict:
    ds = load_ds_json(name)
    owned = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accumulation(global_batch, micro_batch, world_size),
        "gradient_clipping": grad_clip,
    }
    conflicts = [f"{k}: DeepSpeed JSON says {ds[k]!r}, run config gives {v!r}"
                 for k, v in owned.items() if k in ds and ds[k] != "auto" and ds[k] != v]
    for section in ("optimizer", "scheduler"):
        if section in ds:
            conflicts.append(f"{section}: lives in the run config (optim.*), remove it from the JSON")
    if ds.get("fp16", {}).get("enabled"):
        conflicts.append("fp16: not supported (bf16 or fp32 only); set bf16.enabled instead")
    if zero_stage(ds) == 0 and ds.get("bf16", {}).get("enabled"):
        conflicts.append("bf16 with ZeRO stage 0 keeps no exportable fp32 master weights in "
                         "DeepSpeed; use zero_optimization.stage 1 (same speed, sharded optimizer)")
    if conflicts:
        raise ConfigError(f"DeepSpeed config {name!r} contradicts the run config:\n  - "
                          + "\n  - ".join(conflicts))
    zero = ds.get("zero_optimization", {})
    if zero.get("overlap_comm") == "auto":  # no other rank: overlapping only adds device syncs
        ds = {**ds, "zero_optimization": {**zero, "overlap_comm": world_size > 1}}
    return {**RUNTIME_DEFAULTS, **ds, **owned}


def uses_bf16(ds: dict) -> bool:
    return bool(ds.get("bf16", {}).get("enabled"))


def compute_dtype(ds: dict) -> torch.dtype:
    """The dtype the engine's module computes in: bf16 when the JSON enables it, else fp32."""
    return torch.bfloat16 if uses_bf16(ds) else torch.float32


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
