"""Small real image files for the data tests: JPEGs (RGB, CMYK, grayscale), a PNG named .JPEG,
an unreadable file, ImageNet-style trees and the ILSVRC tar-of-tars."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1] // 5, size[0] // 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize(size, Image.NEAREST)
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, quality=90)
    return out.getvalue()


def solid_jpeg(index: int, size=(48, 40)) -> bytes:
    """A flat colour that encodes `index` (0..999), readable back from any crop."""
    rgb = (index % 10 * 25 + 10, index // 10 % 10 * 25 + 10, index // 100 % 10 * 25 + 10)
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


def solid_index(img) -> int:
    """Inverse of solid_jpeg for a uint8 [3, H, W] crop."""
    r, g, b = (round((float(c) - 10) / 25) for c in img.float().mean(dim=(1, 2)))
    return r + 10 * g + 100 * b


def mini_imagenet(root: Path, classes=("n01440764", "n01443537", "n02102040"), per_class=5) -> dict:
    """root/<wnid>/<wnid>_<i>.JPEG plus the ImageNet oddities; returns what was written."""
    oddities = {}
    for c, wnid in enumerate(classes):
        (root / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(100 * c + i, size=(40 + 8 * i, 30 + 4 * c)))
    w0, w1, w2 = classes
    oddities["cmyk"] = root / w0 / f"{w0}_cmyk.JPEG"
    oddities["cmyk"].write_bytes(jpeg(7, mode="CMYK"))
    oddities["gray"] = root / w1 / f"{w1}_gray.JPEG"
    oddities["gray"].write_bytes(jpeg(8, mode="L"))
    oddities["png"] = root / w2 / f"{w2}_png.JPEG"
    oddities["png"].write_bytes(jpeg(9, fmt="PNG"))
    oddities["broken"] = root / w2 / f"{w2}_broken.JPEG"
    oddities["broken"].write_bytes(b"\xff\xd8\xff\xe0 this is not an image")
    return oddities


def ilsvrc_tar_of_tars(tree: Path, out: Path) -> Path:
    """ILSVRC2012_img_train.tar layout: one <wnid>.tar per class, JPEGs at its top level."""
    with tarfile.open(out, "w") as outer:
        for class_dir in sorted(p for p in tree.iterdir() if p.is_dir()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for f in sorted(class_dir.iterdir()):
                    inner.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{class_dir.name}.tar")
            info.size = len(buf.getvalue())
            outer.addfile(info, io.BytesIO(buf.getvalue()))
    return out
