"""Optional accelerators: apex's fused kernels when importable, torch.compile behind a switch.

NVIDIA apex is not on PyPI (the `apex` there is an unrelated web toolkit): it is used when a
cluster image provides it, and torch's own fused paths are used otherwise.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

log = logging.getLogger("dbot_ds")


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device):
    """apex FusedAdam (AdamW mode) on GPUs when importable, else torch AdamW (fused on GPUs)."""
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(param_groups, lr=lr, betas=betas, adam_w_mode=True)
        except ImportError:
            pass
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device.type == "cuda")


def fuse_layernorms(module: nn.Module) -> int:
    """Swap nn.LayerNorm for apex FusedLayerNorm in place (same parameters); 0 without apex/GPU."""
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return 0
    swapped = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.LayerNorm and child.weight is not None and child.weight.is_cuda:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps).to(child.weight.device)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
                swapped += 1
    return swapped


def try_compile(module: nn.Module, backend: str, *example_inputs) -> bool:
    """Compile `module` in place (state_dict names unchanged); if the backend is unavailable or
    fails on a first call with example inputs, warn and stay eager. Returns whether it compiled."""
    if not backend:
        return False
    try:
        module.compile(backend=backend)
        with torch.no_grad():
            module(*example_inputs)
        return True
    except Exception as e:  # no compiler, unknown backend, unsupported op...
        module._compiled_call_impl = None  # back to eager
        warnings.warn(f"torch.compile(backend={backend!r}) unavailable here, running eagerly: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False
