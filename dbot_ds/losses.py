"""Distillation losses on masked tokens, and the parameter-free target normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("smooth_l1", "cosine")


def normalize_tokens(t: torch.Tensor) -> torch.Tensor:
    """Per-token zero mean / unit variance over channels, no affine (authors' norm_feature_loss)."""
    return F.layer_norm(t, t.shape[-1:], eps=1e-6)


def masked_distill_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                        kind: str = "smooth_l1", beta: float = 2.0) -> torch.Tensor:
    """pred, target [B, 1+N, D]; mask [B, N] (1 = masked). The cls token counts as masked.

    Returns the mean per-token loss over cls + masked tokens (visible tokens weigh 0).
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(-1)
    elif kind == "cosine":
        per_token = -F.cosine_similarity(pred, target, dim=-1)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    weights = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1).float()
    return (per_token * weights).sum() / weights.sum()
