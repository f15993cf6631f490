"""A small real labelled image set that needs no download: scikit-learn's bundled 8x8 digits
(1,797 images, 10 classes), upscaled to RGB JPEGs and converted to train / val shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dbot_ds.data.tools.convert import convert
from dbot_ds.data.tools.sources import imagefolder


def write_digits(out: str | Path, size: int = 40, val_fraction: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
    """-> (train manifest, val manifest) under out/."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    n_val = int(len(order) * val_fraction)
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        for i in idx:
            gray = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            img = Image.fromarray(gray).resize((size, size), Image.BICUBIC).convert("RGB")
            folder = out / "images" / split / f"digit_{digits.target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"digits_{i:04d}.JPEG", quality=95)
    manifests = []
    for split in ("train", "val"):
        items, classes = imagefolder(out / "images" / split)
        convert(items, classes, out / split, prefix=split, seed=seed, shard_size=256, progress=False)
        manifests.append(out / split / "manifest.json")
    return manifests[0], manifests[1]
