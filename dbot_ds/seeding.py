"""Seeds derived from names and counters: every random choice of a run is a function of the
run seed and its position, so resumed runs replay exactly and ranks agree where they must."""

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *keys) -> int:
    text = ":".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """torch's, numpy's and python's global generators (timm's augmentations and Mixup draw from
    all three)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
