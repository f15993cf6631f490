"""Optional JPEG decoding on the accelerator (data.decode=device).

16 CPU cores cannot decode full-size JPEGs as fast as ViT-B trains on one H200 (about 5.3k
images/s). In this mode the loader workers only read tars and draw each sample's crop box and
flip (from the JPEG header, no decode); the training process decodes the batch with
torchvision.io.decode_jpeg on the device and crops, resizes, flips and normalises there.

nvJPEG decodes YCbCr and grayscale JPEGs; a CMYK/YCCK one is a bad sample here (shards made by
`dbot-ds shards convert` hold none: it re-encodes them as RGB).
"""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import simplejpeg
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from dbot_ds.data.transforms import normalize_on_device, rrc_box


class JpegBatch(NamedTuple):
    data: list[torch.Tensor]  # B x uint8 [nbytes] encoded JPEGs
    boxes: torch.Tensor       # [B, 4] top, left, height, width in source pixels
    flips: torch.Tensor       # [B] bool

    def __len__(self) -> int:
        return len(self.data)


def jpeg_sample(data: bytes, scale: tuple[float, float], hflip: bool, rng: random.Random):
    """Worker side: header only, then the crop box and flip. Raises on a non-JPEG."""
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace not in ("YCbCr", "Gray"):
        raise ValueError(f"{colorspace} JPEG: the device decoder reads YCbCr and gray only; "
                         "re-encode it with `dbot-ds shards convert`")
    box = rrc_box(height, width, scale, rng)
    flip = hflip and rng.random() < 0.5
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), torch.tensor(box), flip


def collate_jpegs(samples) -> JpegBatch:
    data, boxes, flips = zip(*samples)
    return JpegBatch(list(data), torch.stack(boxes), torch.tensor(flips))


@functools.lru_cache(maxsize=None)
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def decode_on_device(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """-> uint8 [3, H, W] images on device. On CUDA the call runs with a stream of its own
    current: torchvision allocates the outputs on the current stream but decodes on another one
    that does not wait for it, so on the training stream nvJPEG could write into blocks that
    queued kernels still read (pytorch/vision PR 9606). The images are then handed to the
    current stream, and marked used there so their blocks are not recycled too early."""
    if device.type != "cuda":
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    current, side = torch.cuda.current_stream(device), _decode_stream(device)
    with torch.cuda.stream(side):
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    current.wait_stream(side)
    for img in images:
        img.record_stream(current)
    return images


def decode_batch(batch: JpegBatch, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """-> normalised [B, 3, size, size] on device. Per image the crop's resize (images differ in
    size) and its flip; rounding (as the CPU path's uint8) and normalisation once per batch."""
    images = decode_on_device(batch.data, device)
    crops = []
    for img, (top, left, h, w), flip in zip(images, batch.boxes.tolist(), batch.flips.tolist()):
        crop = F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(size, size),
                             mode="bicubic", antialias=True, align_corners=False)  # as PIL's BICUBIC
        crops.append(crop.flip(-1) if flip else crop)
    out = torch.cat(crops).round_().clamp_(0, 255)  # [B, 3, size, size], whole numbers
    return normalize_on_device(out, device, dtype)
