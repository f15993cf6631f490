"""DeepSpeed around the model: process group, parameter groups, engine, fp32 weights, gathering.

With checkpoint.py, the only module that imports deepspeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from dbot_ds.config import TrainingConfig
from dbot_ds.runtime.accel import adamw, fuse_layernorms
from dbot_ds.runtime.distributed import World, all_reduce_sum, barrier, export_rendezvous_env

def init_distributed(world: World) -> torch.device:
    """Process group (NCCL on GPUs, gloo on CPU) and this rank's device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    export_rendezvous_env(world)
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        deepspeed.init_distributed(dist_backend="nccl")
        return torch.device("cuda", world.local_rank)
    deepspeed.init_distributed(dist_backend="gloo")
    return torch.device("cpu")


def accelerator():
    """DeepSpeed's accelerator object (its synchronize() is what its timers and ZeRO call)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def shutdown_distributed() -> None:
    """Tear the process group down before exit (an exiting gloo group can abort the process)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and other 1-D tensors (norms, layer scales) or on what the model
    lists in `no_weight_decay()`; everything else decays (as the authors' timm add_weight_decay)."""
    skip_names = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name in skip_names
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def initialize(model: nn.Module, ds_config: dict, device: torch.device, lr: float,
               betas: tuple[float, float], groups: Callable[[nn.Module], list[dict]], eps: float = 1e-8):
    """The one deepspeed.initialize: the model on its device (apex LayerNorms when importable),
    AdamW (fused) over `groups(model)`."""
    model.to(device)
    fuse_layernorms(model)  # before the groups are made: it replaces LayerNorm parameters
    opt = adamw(groups(model), lr, betas, eps, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine


def build_engine(model: nn.Module, cfg: TrainingConfig, ds_config: dict, device: torch.device,
                 groups: Callable[[nn.Module], list[dict]] | None = None):
    """A fresh engine and a fresh optimizer over `groups(model)` (default: param_groups with the
    config's weight decay): nothing carries over from a previous stage."""
    groups = groups or (lambda m: param_groups(m, cfg.optim.weight_decay))
    return initialize(model, ds_config, device, cfg.peak_lr(), cfg.optim.betas, groups, cfg.optim.eps)


def set_lr(engine, lr: float) -> None:
    """lr for every group, scaled by the group's lr_scale where it has one (layer decay)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def full_fp32_state(engine) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights on CPU (the optimizer's master copy under bf16/ZeRO).
    Collective under ZeRO-3: every rank must call it. Buffers are not included."""
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


def weights_finite(engine) -> bool:
    """Whether every rank's weights are finite. Collective (one all-reduce); under ZeRO-3 each
    rank checks its own partition."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    bad = torch.zeros((), device=engine.device)
    for p in params:
        bad += (~torch.isfinite(p.detach())).any().to(bad)
    all_reduce_sum(bad)
    return bad.item() == 0


def module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def replicas_identical(module: nn.Module) -> bool:
    """True when every rank holds bit-identical weights (call before ZeRO partitions them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True
    digest = module_digest(module)
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    return len(set(digests)) == 1


def gather(engine):
    """(parameters) -> a context in which they are whole on this rank: ZeRO-3 gathers them,
    every other stage holds them whole already."""
    if engine.zero_optimization_stage() == 3:
        return lambda params: deepspeed.zero.GatheredParameters(list(params))
    return lambda params: contextlib.nullcontext()
