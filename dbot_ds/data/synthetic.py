"""Images generated from a seed: no files, no downloads, the same on every rank and every run."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from dbot_ds.data.transforms import random_resized_crop_flip
from dbot_ds.seeding import derive_seed


def generate_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, size, size]: colour gradients with a few random rectangles and discs,
    structured enough that masked patches are predictable from visible ones."""
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


class SyntheticImages(Dataset):
    """Indexed by (epoch, i): the augmentation of sample i in epoch e is a function of
    (seed, epoch, i), so a resumed epoch sees exactly the crops it would have seen."""

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


def write_generated_imagefolder(root, n: int, size: int, seed: int, classes: int = 10) -> None:
    """Generated images as JPEG files in root/<class>/<name>.JPEG (an ImageFolder tree)."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    images = generate_images(n, size, derive_seed(seed, "synthetic-images"))
    for i, img in enumerate(images):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"gen_{i:07d}.JPEG", quality=90)
