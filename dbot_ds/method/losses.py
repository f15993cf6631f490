"""Distillation losses on masked tokens, and the parameter-free target normalisation."""

from __future__ import annotations

import math
from typing import get_args

import torch
import torch.nn.functional as F

from dbot_ds.config.pretrain import LossKind, LossTokens

LOSSES, LOSS_TOKENS = get_args(LossKind), get_args(LossTokens)  # the config's choices
COSINE_EPS = 1e-6  # the authors' nn.CosineSimilarity(eps=1e-6)


def normalize_tokens(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per token: (t - mean) / sqrt(unbiased var + eps) over channels, no affine: the authors'
    norm_feature_loss. One fused layer_norm: with var_u = var_b * D / (D - 1),
    (t - mean) / sqrt(var_u + eps) = layer_norm(t, eps * (D - 1) / D) * sqrt((D - 1) / D)."""
    d = t.shape[-1]
    return F.layer_norm(t, (d,), eps=eps * (d - 1) / d) * math.sqrt((d - 1) / d)


def masked_distill_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                        kind: str = "smooth_l1", beta: float = 2.0,
                        tokens: str = "cls_and_masked") -> torch.Tensor:
    """pred, target [B, 1+N, D]; mask [B, N] (1 = masked).

    The mean per-token loss over the counted tokens, every token of the batch weighing the same:
    the cls token and the masked patches (main branch), or the masked patches only (`tokens=
    "masked"`, the CLIP recipe). Visible patches never count. smooth_l1 averages over channels;
    cosine is 1 - cos(pred, target).
    """
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(-1)  # [B, 1+N]
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(pred, target, dim=-1, eps=COSINE_EPS)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {LOSSES}")
    if tokens == "masked":
        weights = mask.float()
        per_token = per_token[:, 1:]
    elif tokens == "cls_and_masked":
        weights = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1).float()
    else:
        raise ValueError(f"unknown loss tokens {tokens!r}; choose one of {LOSS_TOKENS}")
    return (per_token * weights).sum() / weights.sum()
