"""`dbot-ds bench-data`: the shard loader's images/s against raw Pillow decode, in one run.

Absolute rates drift by 25% between runs on small shared machines; the ratios (loader per core
/ raw decode per core, pre-resized / full-size) measured in the same process, interleaved and
taken as medians, are what to compare.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from dbot_ds.data.shard_loader import ShardStream
from dbot_ds.data.shards import read_manifest
from dbot_ds.data.tar_samples import iter_shard_samples


def natural_like_jpeg(rng: np.random.Generator, size=(500, 375)) -> bytes:
    """An ImageNet-like JPEG (ImageNet's mean is about 400x350, 110 KB): smooth regions, edges
    and texture, so the decoder does realistic work."""
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


def _write_natural(job: tuple[Path, int, int]) -> None:
    root, i, seed = job
    jpeg = natural_like_jpeg(np.random.default_rng([seed, i]))  # image i is the same whoever writes it
    (root / f"n{i % 10:08d}" / f"img_{i:06d}.JPEG").write_bytes(jpeg)


def write_natural_imagefolder(root: Path, n: int, seed: int = 0, workers: int = 1) -> None:
    """n ImageNet-like JPEGs in 10 class folders root/n0000000k/ (about 10 ms each per core)."""
    for c in range(min(10, n)):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, i, seed) for i in range(n)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_natural, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_natural(job)


def make_sets(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    from data_tools.convert import convert
    from data_tools.sources import imagefolder

    write_natural_imagefolder(work / "images", n, seed)
    items, classes = imagefolder(work / "images")
    convert(items, classes, work / "full", shard_size=100, progress=False)
    convert(items, classes, work / "resized", shard_size=100, resize_short_side=256, progress=False)
    return work / "full" / "manifest.json", work / "resized" / "manifest.json"


def raw_decode_rate(jpegs: list[bytes]) -> float:
    t = time.perf_counter()
    for data in jpegs:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(jpegs) / (time.perf_counter() - t)


def loader_rate(manifest: Path, workers: int, crop: int = 224, micro: int = 50) -> float:
    m = read_manifest(manifest)
    micro = max(1, min(micro, m.total // 8))
    ds = ShardStream(manifest=m, rank=0, world=1, micro=micro, accum=1, seed=0, crop=crop,
                     scale=(0.2, 1.0), hflip=True, shuffle_buffer=200)
    ds.set_position(0, 0)
    loader = DataLoader(ds, batch_size=micro, num_workers=workers, persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # workers started, first batch out
    t, count = time.perf_counter(), 0
    for batch in it:
        count += batch.shape[0]
    return count / (time.perf_counter() - t)


def bench(n: int = 600, repeats: int = 3, workers: int | None = None, seed: int = 0,
          work: str | None = None) -> dict:
    workers = workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        full, resized = make_sets(Path(tmp), n, seed)
        jpegs = [s["jpg"] for url in read_manifest(full).urls() for s in iter_shard_samples(url)]
        rows = {k: [] for k in ("raw_decode", "full_1", "resized_1", f"full_{workers}", f"resized_{workers}")}
        for _ in range(repeats):  # interleaved A B A B
            rows["raw_decode"].append(raw_decode_rate(jpegs))
            rows["full_1"].append(loader_rate(full, 0))
            rows["resized_1"].append(loader_rate(resized, 0))
            rows[f"full_{workers}"].append(loader_rate(full, workers))
            rows[f"resized_{workers}"].append(loader_rate(resized, workers))
        sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:1]]
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "images": n, "image_size": sizes[0], "mean_jpeg_kb": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
        "workers": workers, "repeats": repeats, "images_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratios": {
            "full_pipeline_per_core / raw_decode": round(med["full_1"] / med["raw_decode"], 3),
            "resized_pipeline_per_core / raw_decode": round(med["resized_1"] / med["raw_decode"], 3),
            "resized / full (per core)": round(med["resized_1"] / med["full_1"], 3),
            f"resized / full ({workers} workers)": round(med[f"resized_{workers}"] / med[f"full_{workers}"], 3),
        },
    }


def format_report(r: dict) -> str:
    lines = [f"{r['images']} generated JPEGs of {r['image_size'][0]}x{r['image_size'][1]} "
             f"(mean {r['mean_jpeg_kb']} KB), median of {r['repeats']} interleaved repeats"]
    lines += [f"  {k:24s} {v:8.1f} images/s" for k, v in r["images_per_s"].items()]
    lines += [f"  {k:40s} {v:.3f}" for k, v in r["ratios"].items()]
    return "\n".join(lines)


def main(args) -> int:
    r = bench(args.images, args.repeats, args.workers, work=args.work_dir)
    print(format_report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0
