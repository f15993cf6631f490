"""The paper's augmentation on uint8 CPU images: RandomResizedCrop (bicubic) + flip, and the CLIP
recipe's colour jitter; the input normalisations, applied on the device."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps
import torchvision.transforms.functional as TF1  # PIL images and tensors alike
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dbot_ds.data.shards import IMAGE_KEY, sample_label
from dbot_ds.input_norms import INPUT_NORMS, STUDENT_NORM
from dbot_ds.seeding import seed_everything

JITTER_OPS = (TF1.adjust_brightness, TF1.adjust_contrast, TF1.adjust_saturation)
# What Pillow and simplejpeg raise for bytes that are not a readable image (truncated, foreign
# formats, decompression bombs, broken headers).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImage(Exception):
    """A sample that cannot be read or decoded: bad data (counted and replaced by the loader).
    Anything else raised while preparing a sample is a bug and stops the run."""


@contextlib.contextmanager
def decoding(what: str = "image"):
    """Decode errors inside become UnreadableImage."""
    try:
        yield
    except DECODE_ERRORS as e:
        raise UnreadableImage(f"unreadable {what} ({type(e).__name__}: {e})") from e


def open_rgb(data: bytes) -> Image.Image:
    """Any image file Pillow reads, decoded (not lazily) to RGB."""
    with decoding():
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")


def rrc_box(height: int, width: int, scale: tuple[float, float], rng: random.Random,
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit RNG: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(img, strength: float, rng: random.Random):
    """torchvision's ColorJitter(strength, strength, strength) with an explicit RNG: brightness,
    contrast and saturation factors drawn from [1 - s, 1 + s], applied in a random order. Works
    on a PIL image or a uint8 tensor; strength 0 returns img untouched (no draws)."""
    if strength <= 0:
        return img
    factors = [rng.uniform(max(0.0, 1 - strength), 1 + strength) for _ in JITTER_OPS]
    for i in rng.sample(range(len(JITTER_OPS)), len(JITTER_OPS)):
        img = JITTER_OPS[i](img, factors[i])
    return img


def random_resized_crop_flip(img: torch.Tensor, size: int, scale: tuple[float, float], hflip: bool,
                             rng: random.Random, jitter: float = 0.0) -> torch.Tensor:
    """img uint8 [3, H, W] -> uint8 [3, size, size]: jitter (on the whole image, as the authors'
    ColorJitter before the crop), bicubic RandomResizedCrop, flip."""
    top, left, h, w = rrc_box(img.shape[-2], img.shape[-1], scale, rng)
    flip = hflip and rng.random() < 0.5
    img = color_jitter(img, jitter, rng)
    out = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True)
    return out.flip(-1) if flip else out


def decode_crop(data: bytes, size: int, scale: tuple[float, float], hflip: bool,
                rng: random.Random, jitter: float = 0.0) -> torch.Tensor:
    """JPEG bytes -> colour jitter (whole image) -> bicubic RandomResizedCrop + flip -> uint8
    [3, size, size].

    simplejpeg (libjpeg-turbo) decodes about 30% faster than Pillow. The crop box is drawn on
    the full image; when it is 2x+ larger than the output, the JPEG is decoded at a reduced DCT
    scale (1/2, 1/4, 1/8), which is much cheaper and the same at the output size."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        img = None
    except ValueError:  # not a JPEG that simplejpeg reads (e.g. a PNG): Pillow decodes it
        img = open_rgb(data)
        width, height = img.size
    top, left, h, w = rrc_box(height, width, scale, rng)
    if img is None:
        reduce = min(h, w) / size
        limit = {"min_height": math.ceil(height / reduce), "min_width": math.ceil(width / reduce)} \
            if reduce >= 2 else {}
        with decoding("JPEG"):
            img = Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB", **limit))
    flip = hflip and rng.random() < 0.5
    img = color_jitter(img, jitter, rng)
    sx, sy = img.width / width, img.height / height
    img = img.resize((size, size), Image.BICUBIC, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy),
                     reducing_gap=None)
    out = np.asarray(img)  # [size, size, 3]
    if flip:
        out = out[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a fresh torch.tensor(..., device=cuda) every step would sync."""
    mean, std = INPUT_NORMS[STUDENT_NORM]
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize_on_device(imgs_u8: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, H, W] (pinned; or whole-number floats) -> [B, 3, H, W] in dtype on device,
    normalised with STUDENT_NORM."""
    mean, std = _mean_std(torch.device(device))
    x = imgs_u8.to(device, non_blocking=True).float()
    return x.sub_(mean).div_(std).to(dtype)


def posterize(img: Image.Image, bits: int, **_) -> Image.Image:
    """Keep `bits` of each channel; 0 keeps none (a black image), as Pillow did until 13 refused
    it: what RandAugment's PosterizeIncreasing gave the authors at magnitude 10."""
    if bits >= 8:
        return img
    return ImageOps.posterize(img, bits) if bits > 0 else Image.new(img.mode, img.size)


def with_zero_bit_posterize(transform):
    """timm's transform with every RandAugment posterize op taking 0 bits (see posterize)."""
    from timm.data.auto_augment import RandAugment

    for t in getattr(transform, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize
    return transform


class ClassifySample:
    """Fine-tuning: (raw sample, rng) -> (float image [3, H, W] after timm's training transform:
    RandomResizedCrop, flip, RandAugment, normalisation, random erasing; label)."""

    def __init__(self, size: int, randaug: str, reprob: float, remode: str):
        from timm.data import create_transform

        self.transform = with_zero_bit_posterize(create_transform(
            size, is_training=True, auto_augment=randaug, re_prob=reprob, re_mode=remode, interpolation="bicubic"))

    def __call__(self, sample: dict, rng: random.Random):
        try:  # the label and the decode are the bad data that may fail here
            label = sample_label(sample)
        except ValueError as e:
            raise UnreadableImage(str(e)) from None
        img = open_rgb(sample[IMAGE_KEY])
        seed_everything(rng.getrandbits(62))  # timm's transforms draw from the global generators
        return self.transform(img), label

