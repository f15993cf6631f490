"""Masks as pure functions: MAE's random masking (explicit generator) and BEiT's block-wise
masking (explicit python RNG)."""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import numpy as np
import torch

from dbot_ds.models.sizes import num_visible


class Masks(NamedTuple):
    ids_keep: torch.Tensor | None     # [B, K] indices of visible patches (random masking only)
    ids_restore: torch.Tensor | None  # [B, N] inverse of the shuffle (random masking only)
    mask: torch.Tensor                # [B, N] 1.0 = masked (predicted), 0.0 = visible


def random_masking(batch: int, num_patches: int, ratio: float, *,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Masks:
    keep = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= keep).float()  # a patch is masked when its place in the shuffle is past the kept
    return Masks(ids_shuffle[:, :keep], ids_restore, mask)


def block_mask(grid: int, num_masked: int, rng: random.Random, *, min_block: int = 16,
               max_block: int | None = None, min_aspect: float = 0.3) -> np.ndarray:
    """BEiT's block-wise masking of one image: bool [grid, grid] with up to `num_masked` patches.

    Rectangles of min_block..budget patches and aspect min_aspect..1/min_aspect are placed at
    random; one that adds new patches without exceeding the budget is kept (10 tries each), until
    the count is reached or no rectangle fits. The draws from `rng` come in BEiT's order, so the
    same seed gives BEiT's MaskingGenerator's mask.
    """
    mask = np.zeros((grid, grid), dtype=bool)
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        added = _add_block(mask, min(num_masked - count, max_block), min_block, log_aspect, rng)
        if added == 0:
            break
        count += added
    return mask


def _add_block(mask: np.ndarray, budget: int, min_block: int, log_aspect: tuple[float, float],
               rng: random.Random) -> int:
    """Masks one more rectangle in place; returns how many patches it added (0: none fitted)."""
    rows, cols = mask.shape
    for _ in range(10):
        area = rng.uniform(min_block, budget)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < rows and w < cols:
            top, left = rng.randint(0, rows - h), rng.randint(0, cols - w)
            block = mask[top:top + h, left:left + w]
            added = h * w - int(block.sum())
            if 0 < added <= budget:
                block[...] = True
                return added
    return 0


def block_masking(batch: int, grid: int, num_masked: int, rng: random.Random, *,
                  device: torch.device | str | None = None, **block_kw) -> Masks:
    """A batch of BEiT block masks (counts may fall short of num_masked, as BEiT's): only the
    mask, for the encoder that sees every position."""
    masks = np.stack([block_mask(grid, num_masked, rng, **block_kw).reshape(-1) for _ in range(batch)])
    host = torch.from_numpy(masks.astype(np.float32))  # [B, N]
    device = torch.device(device or "cpu")
    if device.type == "cuda":  # pinned: the copy below does not block the host
        host = host.pin_memory()
    return Masks(None, None, host.to(device, non_blocking=True))
