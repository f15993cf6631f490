"""MAE-style random masking as pure functions (no module state, explicit generator)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Masks(NamedTuple):
    ids_keep: torch.Tensor     # [B, K] indices of visible patches
    ids_restore: torch.Tensor  # [B, N] inverse of the shuffle
    mask: torch.Tensor         # [B, N] 1.0 = masked (predicted), 0.0 = visible


def num_visible(num_patches: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    keep = int(num_patches * (1 - ratio))  # MAE's rounding
    if keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible patch out of {num_patches}")
    return keep


def random_masking(batch: int, num_patches: int, ratio: float, *,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Masks:
    keep = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masks(ids_shuffle[:, :keep], ids_restore, mask)
