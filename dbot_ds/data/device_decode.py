"""Optional JPEG decoding on the accelerator (data.decode=device).

16 CPU cores cannot decode full-size JPEGs as fast as ViT-B trains on one H200 (about 5.3k
images/s). In this mode the loader workers only read tars and draw each sample's crop box and
flip (from the JPEG header, no decode), and hand over a batch as one flat uint8 tensor of the
JPEGs end to end plus offsets (one shared-memory block per batch, not one per image). The
training process decodes the batch in one call (TorchCodec's decode_jpeg when installed,
torchvision's otherwise) and crops, resizes, flips and normalises every image with two batched
matrix products per group of similar crops.

The resize is PIL's bicubic box resize (a = -0.5, the filter widened by the scale factor when
shrinking, neighbouring pixels outside the box included, the horizontal pass rounded to whole
levels before the vertical one), written as per-image weight matrices, so the crops match the
CPU path's to a level or two (the JPEG decoders differ).

nvJPEG decodes YCbCr and grayscale JPEGs; a CMYK/YCCK one is a bad sample here (shards made by
`dbot-ds shards convert` hold none: it re-encodes them as RGB).
"""

from __future__ import annotations

import functools
import random
import warnings
from typing import NamedTuple

import simplejpeg
import torch

from dbot_ds.data.transforms import UnreadableImage, decoding, normalize_on_device, rrc_box

GROUP = 32  # crops resized per batched product: padding to the group's largest crop stays small


class JpegBatch(NamedTuple):
    data: torch.Tensor     # uint8 [total bytes]: every sample's JPEG, end to end
    offsets: torch.Tensor  # int64 [B + 1]: sample i is data[offsets[i]:offsets[i + 1]]
    boxes: torch.Tensor    # [B, 4] top, left, height, width in source pixels
    flips: torch.Tensor    # [B] bool

    def __len__(self) -> int:
        return len(self.boxes)

    def jpegs(self) -> list[torch.Tensor]:
        """Views of the flat buffer, one 1-D uint8 tensor per image (no copies)."""
        return list(torch.split(self.data, torch.diff(self.offsets).tolist()))


def jpeg_sample(data: bytes, scale: tuple[float, float], hflip: bool, rng: random.Random):
    """Worker side: header only, then the crop box and flip. Raises on a non-JPEG."""
    with decoding("JPEG header"):
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace not in ("YCbCr", "Gray"):
        raise UnreadableImage(f"{colorspace} JPEG: the device decoder reads YCbCr and gray only; "
                              "re-encode it with `dbot-ds shards convert`")
    box = rrc_box(height, width, scale, rng)
    flip = hflip and rng.random() < 0.5
    return data, box, flip


def collate_jpegs(samples) -> JpegBatch:
    """Worker side: a batch as one flat byte tensor plus offsets."""
    data, boxes, flips = zip(*samples)
    sizes = torch.tensor([0, *map(len, data)], dtype=torch.int64)
    return JpegBatch(torch.frombuffer(bytearray().join(data), dtype=torch.uint8), sizes.cumsum(0),
                     torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips, dtype=torch.bool))


@functools.lru_cache(maxsize=None)
def jpeg_decoder():
    """TorchCodec's decode_jpeg (torchvision 0.29 deprecated its decoders in its favour), or
    torchvision's where TorchCodec is not installed: (list of 1-D uint8, device) -> list of
    uint8 [3, H, W]. Its `library` attribute says which."""
    try:
        from torchcodec.decoders import decode_jpeg

        def decode(jpegs, device):
            return decode_jpeg(jpegs, mode="RGB", device=device)
        decode.library = "torchcodec"
    except (ImportError, OSError, RuntimeError):  # not installed, or its native libraries do not load
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode_jpeg

        def decode(jpegs, device):
            with warnings.catch_warnings():  # deprecated in torchvision 0.29, working still
                warnings.simplefilter("ignore", DeprecationWarning)
                return tv_decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        decode.library = "torchvision"
    return decode


@functools.lru_cache(maxsize=None)
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def decode_on_device(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """-> uint8 [3, H, W] images on `device`. On CUDA the decoder runs with a stream of its own
    current, on which nothing else ever runs: torchvision allocates the outputs on the current
    stream but decodes on another one that does not wait for it, so on a busy stream nvJPEG could
    write into blocks that queued kernels still read (pytorch/vision PR 9606). The images are then
    handed to the caller's stream, and marked used there so their blocks are not recycled early."""
    if device.type != "cuda":
        return jpeg_decoder()(jpegs, device)
    current, side = torch.cuda.current_stream(device), _decode_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        images = jpeg_decoder()(jpegs, device)
    current.wait_stream(side)
    for img in images:
        img.record_stream(current)
    return images


def bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, full: torch.Tensor, first: torch.Tensor,
                     span: int, out: int) -> torch.Tensor:
    """PIL's resampling coefficients along one axis, one matrix per image: [G, out, span].

    start, length: the box along this axis; full: the image's size along it; first: the pixel
    index column 0 of the span stands for (the padded region starts there)."""
    scale = (length / out).unsqueeze(1)                                     # [G, 1]
    widen = scale.clamp(min=1.0)                                            # shrinking widens the filter
    support = 2.0 * widen
    center = start.unsqueeze(1) + (torch.arange(out, device=start.device) + 0.5) * scale  # [G, out]
    pixel = first.unsqueeze(1) + torch.arange(span, device=start.device)   # [G, span]
    lo = (center - support + 0.5).floor().clamp(min=0)                     # PIL's window
    hi = torch.minimum((center + support + 0.5).floor(), full.unsqueeze(1).to(center.dtype))
    p = pixel.unsqueeze(1).to(center.dtype)                                 # [G, 1, span]
    inside = (p >= lo.unsqueeze(2)) & (p < hi.unsqueeze(2))
    w = bicubic((p - center.unsqueeze(2) + 0.5) / widen.unsqueeze(2)) * inside
    return w / w.sum(-1, keepdim=True)


def resize_crops(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H_i, W_i] images, boxes [B, 4], flips [B] -> whole-number float [B, 3, size, size]:
    each box resized as PIL's bicubic box resize, then flipped where asked. Images are taken in
    groups of similar crop area, each group padded to its largest region and resized with two
    batched products (rows, then columns)."""
    device = images[0].device
    # the regions' bounds on the host, where boxes and image sizes already are: no device sync
    boxes = boxes.cpu()
    hw = torch.tensor([img.shape[-2:] for img in images])                  # [B, 2]
    top, left, h, w = boxes.unbind(1)
    margin_y = (2 * (h / size).clamp(min=1)).ceil().long() + 1              # the filter's reach
    margin_x = (2 * (w / size).clamp(min=1)).ceil().long() + 1
    y0, x0 = (top - margin_y).clamp(min=0), (left - margin_x).clamp(min=0)
    y1, x1 = torch.minimum(top + h + margin_y, hw[:, 0]), torch.minimum(left + w + margin_x, hw[:, 1])
    order = ((y1 - y0) * (x1 - x0)).argsort().tolist()  # similar crops together: little padding
    bounds = torch.stack([y0, y1, x0, x1], 1).tolist()
    top, left, h, w, hw, y0, x0 = (t.to(device) for t in (top, left, h, w, hw, y0, x0))
    flips = flips.to(device)
    out = torch.empty(len(images), 3, size, size, device=device)
    for g in range(0, len(order), GROUP):
        idx = order[g:g + GROUP]
        rows = max(bounds[i][1] - bounds[i][0] for i in idx)
        cols = max(bounds[i][3] - bounds[i][2] for i in idx)
        region = torch.zeros(len(idx), 3, rows, cols, device=device)
        for k, i in enumerate(idx):
            a, b, c, d = bounds[i]
            region[k, :, :b - a, :d - c] = images[i][:, a:b, c:d]
        sel = torch.tensor(idx, device=device)
        wy = resample_weights(top[sel].double(), h[sel].double(), hw[sel, 0], y0[sel], rows, size).float()
        wx = resample_weights(left[sel].double(), w[sel].double(), hw[sel, 1], x0[sel], cols, size).float()
        wx = torch.where(flips[sel].view(-1, 1, 1), wx.flip(1), wx)          # a flip reverses the columns
        across = (region @ wx.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)   # [G, 3, rows, size]
        out[sel] = (wy.unsqueeze(1) @ across).round_().clamp_(0, 255)        # [G, 3, size, size]
    return out


def decode_batch(batch: JpegBatch, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """-> normalised [B, 3, size, size] in dtype on device."""
    images = decode_on_device(batch.jpegs(), device)
    return normalize_on_device(resize_crops(images, batch.boxes, batch.flips, size), device, dtype)
