"""Images generated from a seed: no files to fetch, the same on every rank and every run.

Two kinds: `shapes` (colour gradients with rectangles and discs: structured enough that masked
patches are predictable from visible ones, the demo's data) and `natural` (ImageNet-like 500x375
JPEGs of ~100 KB with smooth regions, edges and texture, so a decoder does realistic work: the
end-to-end and loader benchmarks). Either is held in memory (SyntheticImages), written as an
ImageFolder tree, or converted to shards (generated_shards).
"""

from __future__ import annotations

import io
import multiprocessing
import random
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dbot_ds.data.transforms import random_resized_crop_flip
from dbot_ds.seeding import derive_seed

Kind = Literal["shapes", "natural"]


def generate_images(n: int, size: int, seed: int) -> torch.Tensor:
    """`shapes`: uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    c0, c1 = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    angle = torch.rand(n, 1, 1, 1, generator=g) * 6.2832
    ramp = (xx * angle.cos() + yy * angle.sin()).clamp(0, 1)  # [n, 1, size, size]
    img = c0 + (c1 - c0) * ramp
    for _ in range(3):
        centre = torch.rand(n, 2, 1, 1, generator=g)
        radius = 0.1 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)
        colour = torch.rand(n, 3, 1, 1, generator=g)
        dx, dy = (xx - centre[:, :1]).abs(), (yy - centre[:, 1:]).abs()
        disc = torch.rand(n, 1, 1, 1, generator=g) < 0.5
        inside = torch.where(disc, dx**2 + dy**2 < radius**2, torch.maximum(dx, dy) < radius)
        img = torch.where(inside, colour, img)
    return (img * 255).round().to(torch.uint8)


def natural_like_jpeg(rng: np.random.Generator, size=(500, 375)) -> bytes:
    """`natural`: one ImageNet-like JPEG (ImageNet's mean is about 400x350, 110 KB)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 128 + 80 * np.sin(xx * fx + yy * fy + phase)
    for _ in range(12):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(10, 80)
        img[max(0, y0 - r):y0 + r, max(0, x0 - r):x0 + r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 20, img.shape)
    out = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


class SyntheticImages(Dataset):
    """`shapes` in memory, indexed by (epoch, i): the augmentation of sample i in epoch e is a
    function of (seed, epoch, i), so a resumed epoch sees exactly the crops it would have seen."""

    def __init__(self, n: int, size: int, crop: int, scale: tuple[float, float], hflip: bool, seed: int,
                 jitter: float = 0.0):
        self.images = generate_images(n, size, derive_seed(seed, "synthetic-images"))
        self.crop, self.scale, self.hflip, self.seed, self.jitter = crop, scale, hflip, seed, jitter

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        rng = random.Random(derive_seed(self.seed, "augment", epoch, i))
        return random_resized_crop_flip(self.images[i], self.crop, self.scale, self.hflip, rng, self.jitter)


def _write_natural(job: tuple[Path, int, int, int]) -> None:
    folder, i, seed, classes = job
    jpeg = natural_like_jpeg(np.random.default_rng([seed, i]))  # image i is the same whoever writes it
    (folder / f"n{i % classes:08d}" / f"img_{i:06d}.JPEG").write_bytes(jpeg)


def write_imagefolder(root: str | Path, n: int, seed: int, kind: Kind = "shapes", size: int = 64,
                      classes: int = 10, workers: int = 1) -> Path:
    """n generated JPEGs in `classes` folders root/<class>/ (an ImageFolder tree); `size` is the
    side of `shapes` images (`natural` ones are 500x375)."""
    root = Path(root)
    names = [f"n{c:08d}" for c in range(min(classes, n))]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    if kind == "natural":
        jobs = [(root, i, seed, classes) for i in range(n)]
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                pool.map(_write_natural, jobs, chunksize=64)
        else:
            for job in jobs:
                _write_natural(job)
        return root
    for i, img in enumerate(generate_images(n, size, derive_seed(seed, "synthetic-images"))):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / names[i % len(names)] / f"gen_{i:07d}.JPEG",
                                                          quality=90)
    return root


def generated_shards(out: str | Path, n: int, seed: int, kind: Kind = "shapes", size: int = 64, *,
                     shard_size: int = 256, resize_short_side: int | None = None, workers: int = 1):
    """Generated JPEGs converted to shards in `out` (the JPEG files themselves gone once
    converted); returns the manifest."""
    from dbot_ds.data.tools.convert import convert
    from dbot_ds.data.tools.sources import imagefolder

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        items, classes = imagefolder(write_imagefolder(tmp, n, seed, kind, size, workers=workers))
        return convert(items, classes, out, seed=seed, shard_size=shard_size, resize_short_side=resize_short_side,
                       workers=workers, progress=False)
