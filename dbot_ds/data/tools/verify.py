"""Check a shard set against its manifest; show a few samples; index foreign or remote shards."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from dbot_ds.data.shards import (IMAGE_KEY, LABEL_KEY, META_KEY, Manifest, ShardError, ShardInfo, is_url,
                                  names_outside, read_manifest, sample_label, write_manifest)
from dbot_ds.data.tar_samples import Checksum, iter_shard_samples
from dbot_ds.errors import UserError


def label_of(sample: dict) -> int:
    """A sample's integer label; a ShardError naming the sample when it has none or a garbled one."""
    try:
        return sample_label(sample)
    except ValueError as e:
        raise ShardError(f"{sample.get('__url__')}:{sample.get('__key__')}: {e}") from None


@contextlib.contextmanager
def reading(url: str, fix: str):
    """A shard that cannot be read (broken tar, failing pipe) as one line naming it and the fix."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        raise ShardError(f"{url}: unreadable ({type(e).__name__}: {e}); {fix}") from e


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
    try:
        label = sample_label(sample)
        if not 0 <= label < num_classes:
            out.append(f"label {label} outside [0, {num_classes})")
    except ValueError as e:
        out.append(str(e))
    return out


def wnid_of(m: Manifest, label: int) -> str:
    return m.classes[label] if 0 <= label < len(m.classes) else "outside the class list"


def describe(sample: dict, label: int, wnid: str) -> str:
    try:
        meta = json.loads(sample.get(META_KEY, b"{}"))
    except ValueError:
        meta = {}  # shown as unknown; `verify` checks what training needs
    meta = meta if isinstance(meta, dict) else {}
    return (f"  {sample['__key__']}: label {label} ({wnid}), {meta.get('width')}x{meta.get('height')}, "
            f"{len(sample.get(IMAGE_KEY, b''))} bytes, from {meta.get('filename')}")


def inspect(manifest_path: str | Path, n: int = 5, pipe_urls: bool = False) -> str:
    m = read_manifest(manifest_path)
    lines = [f"{len(m.shards)} shards, {m.total} samples, {len(m.classes)} classes"]
    histogram = Counter()
    shown = 0
    for url in m.urls(pipe_urls):
        with reading(url, "`dbot-ds shards verify` lists every problem of the set"):
            for sample in iter_shard_samples(url):
                label = label_of(sample)
                histogram[label] += 1
                if shown < n:
                    lines.append(describe(sample, label, wnid_of(m, label)))
                    shown += 1
    lines.append("class histogram (label: wnid count):")
    lines += [f"  {label}: {wnid_of(m, label)} {count}" for label, count in sorted(histogram.items())]
    return "\n".join(lines)


def manifest_name(shard: str, folder: Path, url_template: str | None) -> str:
    """How the manifest names a shard: as given (a URL, or a name for the template), else its
    path relative to the manifest's folder."""
    return shard if url_template or is_url(shard) else os.path.relpath(os.path.abspath(shard), folder)


def index(shards: list[str | Path], out: str | Path, classes: list[str] | None = None,
          url_template: str | None = None) -> Manifest:
    """A manifest for shards written elsewhere (e.g. timm/imagenet-1k-wds): counts, sizes and
    sha256, each shard read once, local or remote (webdataset's gopen). Shards are local paths in
    the manifest's folder or below, URLs, or names that `url_template` turns into URLs."""
    out = Path(out)
    folder = Path(os.path.abspath(out.parent))  # lexical, like the manifest's own check: symlinks are fine
    given = {manifest_name(str(p), folder, url_template): str(p) for p in shards}
    outside = [given[name] for name in names_outside(folder, list(given))]
    if outside:
        raise ShardError(f"shards index: {', '.join(outside[:3])} lie outside {folder}; a manifest lists shards "
                         "in its own folder or below: write it with --out in a folder above every shard")
    extra = {"indexed": True, **({"url_template": url_template} if url_template else {})}
    m = Manifest([], [], extra, out.parent)
    infos, max_label = [], -1
    for name in tqdm(sorted(given), desc="index", unit="shard"):
        checksum, url = Checksum(), m.url_of(name)
        with reading(url, "re-fetch or re-write it, or leave it out of the index"):
            labels = [label_of(s) for s in iter_shard_samples(url, checksum)]
        max_label = max([max_label, *labels])
        infos.append(ShardInfo(name, len(labels), checksum.size, checksum.hexdigest()))
    m.shards, m.classes = infos, classes or [str(i) for i in range(max_label + 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(m, out)
    return m
