"""`dbot-ds bench-data`: the shard loader's images/s against raw Pillow decode, in one run.

Absolute rates drift by 25% between runs on small shared machines; the ratios (loader per core
/ raw decode per core, pre-resized / full-size) measured in the same process, interleaved and
taken as medians, are what to compare.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader

from dbot_ds.data.generated import write_imagefolder
from dbot_ds.data.shard_loader import ShardStream
from dbot_ds.data.shards import read_manifest
from dbot_ds.data.tar_samples import iter_shard_samples
from dbot_ds.data.tools.convert import convert
from dbot_ds.data.tools.sources import imagefolder


def make_sets(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    items, classes = imagefolder(write_imagefolder(work / "images", n, seed, "natural"))
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


def register(sub) -> None:
    p = sub.add_parser("bench-data", help="shard loader images/s vs raw Pillow decode (ratios)")
    p.add_argument("--images", type=int, default=600, help="generated full-size JPEGs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, help="loader workers for the total rate (default: all cores)")
    p.add_argument("--work-dir", help="where the temporary shards go (default: the system temp dir)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=main)
