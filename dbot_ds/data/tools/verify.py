"""Check a shard set against its manifest; show a few samples; index foreign or remote shards."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dbot_ds.data.shards import (IMAGE_KEY, LABEL_KEY, META_KEY, Manifest, ShardError, ShardInfo, is_url,
                                  read_manifest, write_manifest)
from dbot_ds.data.tar_samples import Checksum, iter_shard_samples


def verify(manifest_path: str | Path, progress: bool = True, pipe_urls: bool = False) -> list[str]:
    """Every shard, local or remote, read once: sha256, size and sample count as listed, every
    image decodes, every label in range. Returns the problems found (empty: all good)."""
    m = read_manifest(manifest_path)
    problems = []
    for info, url in tqdm(list(zip(m.shards, m.urls(pipe_urls))), desc="verify", unit="shard", disable=not progress):
        if not is_url(url) and not Path(url).is_file():
            problems.append(f"{info.name}: missing")
            continue
        checksum, count = Checksum(), 0
        try:
            for sample in iter_shard_samples(url, checksum):
                count += 1
                problems += [f"{info.name}:{sample['__key__']}: {p}" for p in check_sample(sample, len(m.classes))]
        except Exception as e:  # what was read is hashed too: the checks below fail for it
            problems.append(f"{info.name}: unreadable tar ({type(e).__name__}: {e})")
        if checksum.hexdigest() != info.sha256 or checksum.size != info.bytes:
            problems.append(f"{info.name}: sha256 or size does not match the manifest")
        if count != info.samples:
            problems.append(f"{info.name}: {count} samples, the manifest says {info.samples}")
    return problems


def check_sample(sample: dict, num_classes: int) -> list[str]:
    missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in sample]
    if missing:
        return [f"missing {', '.join(missing)}"]
    out = []
    try:
        with Image.open(io.BytesIO(sample[IMAGE_KEY])) as img:
            img.convert("RGB").load()
    except Exception as e:
        out.append(f"image does not decode ({type(e).__name__}: {e})")
    label = int(sample[LABEL_KEY])
    if not 0 <= label < num_classes:
        out.append(f"label {label} outside [0, {num_classes})")
    return out


def inspect(manifest_path: str | Path, n: int = 5, pipe_urls: bool = False) -> str:
    m = read_manifest(manifest_path)
    lines = [f"{len(m.shards)} shards, {m.total} samples, {len(m.classes)} classes"]
    histogram = Counter()
    shown = 0
    for url in m.urls(pipe_urls):
        for sample in iter_shard_samples(url):
            label = int(sample[LABEL_KEY])
            histogram[label] += 1
            if shown < n:
                meta = json.loads(sample.get(META_KEY, b"{}"))
                lines.append(f"  {sample['__key__']}: label {label} ({m.classes[label]}), "
                             f"{meta.get('width')}x{meta.get('height')}, {len(sample[IMAGE_KEY])} bytes, "
                             f"from {meta.get('filename')}")
                shown += 1
    lines.append("class histogram (label: wnid count):")
    lines += [f"  {label}: {m.classes[label]} {count}" for label, count in sorted(histogram.items())]
    return "\n".join(lines)


def index(shards: list[str | Path], out: str | Path, classes: list[str] | None = None,
          url_template: str | None = None) -> Manifest:
    """A manifest for shards written elsewhere (e.g. timm/imagenet-1k-wds): counts, sizes and
    sha256, each shard read once, local or remote (webdataset's gopen). Shards are local paths in
    the manifest's folder or below, URLs, or names that `url_template` turns into URLs."""
    out = Path(out)
    folder = out.parent.resolve()
    local = [str(p) for p in shards if not url_template and not is_url(str(p))]
    outside = [p for p in local if not Path(p).resolve().is_relative_to(folder)]
    if outside:
        raise ShardError(f"shards index: {', '.join(outside[:3])} lie outside {folder}; a manifest lists shards "
                         "in its own folder or below: write it with --out in a folder above every shard")
    extra = {"indexed": True, **({"url_template": url_template} if url_template else {})}
    m = Manifest([], [], extra, out.parent)
    infos, max_label = [], -1
    for shard in tqdm(sorted(str(p) for p in shards), desc="index", unit="shard"):
        name = shard if url_template or is_url(shard) else str(Path(shard).resolve().relative_to(folder))
        checksum = Checksum()
        labels = [int(s[LABEL_KEY]) for s in iter_shard_samples(m.url_of(name), checksum)]
        max_label = max([max_label, *labels])
        infos.append(ShardInfo(name, len(labels), checksum.size, checksum.hexdigest()))
    m.shards, m.classes = infos, classes or [str(i) for i in range(max_label + 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(m, out)
    return m
