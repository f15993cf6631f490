"""The paper's augmentation (RandomResizedCrop + flip) on uint8 CPU tensors; normalisation on device."""

from __future__ import annotations

import functools
import math

import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rrc_box(height: int, width: int, scale: tuple[float, float], g: torch.Generator,
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_flip(img: torch.Tensor, size: int, scale: tuple[float, float], hflip: bool,
                             g: torch.Generator) -> torch.Tensor:
    """img uint8 [3, H, W] -> uint8 [3, size, size]."""
    top, left, h, w = rrc_box(img.shape[-2], img.shape[-1], scale, g)
    out = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    if hflip and torch.rand(1, generator=g).item() < 0.5:
        out = out.flip(-1)
    return out


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a fresh torch.tensor(..., device=cuda) every step would sync."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize_on_device(imgs_u8: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, H, W] (pinned) -> normalised [B, 3, H, W] in dtype on device."""
    mean, std = _mean_std(torch.device(device))
    x = imgs_u8.to(device, non_blocking=True).float()
    return x.sub_(mean).div_(std).to(dtype)
