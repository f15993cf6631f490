"""Images -> WebDataset shards: global seeded shuffle, parallel, resumable, copy-not-re-encode.

Resume: every finished shard is renamed into place and recorded in .convert/<shard>.json; a
rerun with the same inputs and options writes only the shards that are missing. The manifest
is written last, so a reader never sees a half-converted set.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from dbot_ds.data.shards import Manifest, ShardError, ShardInfo, sample_record, shard_writer, write_manifest
from dbot_ds.data.tools.sources import Item
from dbot_ds.files import atomic_write, file_sha256

JOURNAL = ".convert"


def plan_shards(items: list[Item], seed: int, shard_size: int | None = None,
                shard_bytes: int | None = None) -> list[list[Item]]:
    """A seeded global shuffle, cut into shards of shard_size samples or ~shard_bytes bytes."""
    if not (shard_size or shard_bytes):
        raise ValueError("give a shard size in samples or in bytes")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    shards, current, current_bytes = [], [], 0
    for i in order:
        current.append(items[i])
        current_bytes += items[i].size
        if (shard_size and len(current) >= shard_size) or (shard_bytes and current_bytes >= shard_bytes):
            shards.append(current)
            current, current_bytes = [], 0
    if current:
        shards.append(current)
    return shards


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def normalize_image(data: bytes, resize_short_side: int | None = None) -> tuple[bytes, int, int, str | None]:
    """-> (jpeg bytes, width, height, re-encode reason or None when the bytes are copied).

    RGB JPEGs are copied unchanged; CMYK / grayscale JPEGs and non-JPEG files (ImageNet has a
    PNG named .JPEG) are re-encoded as RGB JPEG. Raises on an unreadable image."""
    img = Image.open(io.BytesIO(data))
    fmt, mode = img.format, img.mode
    if resize_short_side:
        img = img.convert("RGB")
        scale = resize_short_side / min(img.size)
        if scale < 1:
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
        return encode_jpeg(img, 90), img.width, img.height, "resized"
    if fmt == "JPEG" and mode == "RGB":
        width, height = img.size
        img.draft("RGB", (width // 8 or 1, height // 8 or 1))  # a cheap full-stream decode check
        img.load()
        return data, width, height, None
    reason = f"{(fmt or 'unknown').lower()}-{mode.lower()}"
    img = img.convert("RGB")
    return encode_jpeg(img), img.width, img.height, reason


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_shard(job: tuple[Path, str, list[Item], int | None]) -> dict:
    """Write one shard to a temporary name, rename it into place, then journal it."""
    out_dir, name, items, resize = job
    tmp = out_dir / f".{name}.partial"
    writer = shard_writer(tmp)
    reencoded, errors, samples = Counter(), [], 0
    for it in items:
        try:
            jpeg, width, height, reason = normalize_image(it.read(), resize)
        except Exception as e:  # an unreadable input is reported, not fatal
            errors.append({"path": it.path if it.offset < 0 else f"{it.path}:{it.filename}",
                           "reason": f"{type(e).__name__}: {e}"})
            continue
        if reason:
            reencoded[reason] += 1
        meta = {"wnid": it.wnid, "filename": it.filename, "width": width, "height": height}
        writer.write(sample_record(it.key, jpeg, it.label, meta))
        samples += 1
    writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / name)
    record = {"name": name, "samples": samples, "bytes": (out_dir / name).stat().st_size,
              "sha256": file_sha256(out_dir / name), "reencoded": dict(reencoded), "errors": errors}
    atomic_write(out_dir / JOURNAL / f"{name}.json", json.dumps(record).encode())
    return record


def plan_fingerprint(plan: list[list[Item]], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for shard in plan:
        for it in shard:
            h.update(f"{it.key}|{it.label}|{it.path}|{it.offset}|{it.size}\n".encode())
        h.update(b"--\n")
    return h.hexdigest()


def journaled(out_dir: Path, name: str) -> dict | None:
    """The record of a finished shard, if the shard on disk still matches it by size."""
    path = out_dir / JOURNAL / f"{name}.json"
    if not path.is_file() or not (out_dir / name).is_file():
        return None
    record = json.loads(path.read_text())
    return record if (out_dir / name).stat().st_size == record["bytes"] else None


def convert(items: list[Item], classes: list[str], out_dir: str | Path, *, prefix: str = "train",
            seed: int = 0, shard_size: int | None = 1000, shard_bytes: int | None = None,
            resize_short_side: int | None = None, workers: int = 1, progress: bool = True,
            max_shards: int | None = None) -> Manifest | None:
    """Convert (or finish converting) `items` into shards + manifest.json in out_dir.

    max_shards: write at most this many new shards, then stop without a manifest (a way to
    convert in pieces; also how the tests interrupt a conversion)."""
    out_dir = Path(out_dir)
    (out_dir / JOURNAL).mkdir(parents=True, exist_ok=True)
    options = {"prefix": prefix, "seed": seed, "shard_size": shard_size, "shard_bytes": shard_bytes,
               "resize_short_side": resize_short_side, "classes": classes}
    plan = plan_shards(items, seed, shard_size, shard_bytes)
    fingerprint = plan_fingerprint(plan, options)
    plan_file = out_dir / JOURNAL / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text())["fingerprint"] != fingerprint:
        raise ShardError(f"{out_dir} holds a conversion of other inputs or options; "
                         "convert into an empty directory (finished shards are never overwritten)")
    atomic_write(plan_file, json.dumps({"fingerprint": fingerprint, **options}).encode())

    names = [shard_name(prefix, i) for i in range(len(plan))]
    todo = [(out_dir, n, shard, resize_short_side) for n, shard in zip(names, plan) if not journaled(out_dir, n)]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"shards -> {out_dir}",
               unit="shard", disable=not progress)
    todo = todo[:max_shards] if max_shards is not None else todo
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(write_shard, todo):
                bar.update(1)
    else:
        for job in todo:
            write_shard(job)
            bar.update(1)
    bar.close()
    records = [journaled(out_dir, n) for n in names]
    if any(r is None for r in records):
        return None  # stopped early: rerun to finish
    manifest = Manifest([ShardInfo(r["name"], r["samples"], r["bytes"], r["sha256"]) for r in records],
                        classes, {"report": conversion_report(records), "options": options})
    manifest.root = out_dir
    write_manifest(manifest, out_dir / "manifest.json")
    return manifest


def conversion_report(records: list[dict]) -> dict:
    reencoded = Counter()
    for r in records:
        reencoded.update(r["reencoded"])
    errors = [e for r in records for e in r["errors"]]
    return {"samples": sum(r["samples"] for r in records), "reencoded": dict(reencoded),
            "unreadable": len(errors), "errors": errors}
