"""What the tests share: the tiny run, small real images and shards, a tiny pre-trained export,
and the environment for child launchers. Everything here is real data (JPEG files, tar shards)."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from dbot_ds.config import RunConfig, load_config
from dbot_ds.data.shard_loader import ShardStream
from dbot_ds.data.shards import Manifest, ShardInfo, read_manifest, sample_record, shard_writer, write_manifest
from dbot_ds.files import file_sha256

# ---------------------------------------------------------------- the tiny run

# A tiny run: 16 patches of 8 px, 2 blocks; 64 generated images, global batch 16 as 2 micro
# batches of 8 (gradient accumulation 2 in one process) -> 4 steps per epoch.
TINY = [
    "deepspeed=cpu_demo", "model.size=tiny_test", "model.img_size=32",
    "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2",
    "batch.global_batch=16", "batch.micro_batch=8", "optim.warmup_epochs=1",
    "data.synthetic_images=64", "data.num_workers=0", "stages.epochs=[2,2]", "log_every=2",
]


def tiny_args(*extra: str) -> list[str]:
    """The tiny run (plus `extra` overrides) as command-line --set arguments."""
    return [arg for s in (*TINY, *extra) for arg in ("--set", s)]


# The tiny decoder as `dbot-ds bench` arguments (bench builds its own config around a model size).
TINY_DECODER = [arg for s in TINY if s.startswith("model.decoder_") for arg in ("--set", s)]


# The paper's recipes need their ImageNet shards named; config-only tests give a placeholder.
PAPER_DATA = "data.shards=/data/imagenet/train/manifest.json"


def subprocess_env() -> dict:
    """The environment for a child launcher: without this process's rendezvous variables."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@contextlib.contextmanager
def no_eager_fallback():
    """Fails if a compile or CUDA-graph switch fell back to eager (its warning says so)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    fallbacks = [str(w.message) for w in caught if "running eagerly" in str(w.message)]
    assert not fallbacks, fallbacks


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(None, None, [*TINY, *overrides])


def tiny_export(root: Path, *overrides: str) -> Path:
    """A tiny one-stage pre-training run in root/run (in this process): its stage export."""
    from dbot_ds.commands.pretrain import pretrain

    pretrain(tiny_config("stages.epochs=[1]", *overrides), root / "run")
    return root / "run" / "stage1"


# ---------------------------------------------------------------- small real images

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


# ---------------------------------------------------------------- shards

def write_shards(root, sizes, corrupt=(), truncate=None, replace=None):
    """Shards of the given sizes of solid-colour images (sample i's bytes from `replace[i]` when
    given); returns the manifest path."""
    root.mkdir(parents=True, exist_ok=True)
    infos, index_ = [], 0
    for s, n in enumerate(sizes):
        name = f"train-{s:06d}.tar"
        w = shard_writer(root / name)
        for _ in range(n):
            data = b"\xff\xd8 not a jpeg" if index_ in corrupt else (replace or {}).get(index_) or solid_jpeg(index_)
            w.write(sample_record(f"s{index_:05d}", data, index_ % 3, {"wnid": "x"}))
            index_ += 1
        w.close()
        if truncate == s:
            (root / name).write_bytes((root / name).read_bytes()[:3000])
        infos.append(ShardInfo(name, n, (root / name).stat().st_size, file_sha256(root / name)))
    write_manifest(Manifest(infos, ["a", "b", "c"]), root / "manifest.json")
    return root / "manifest.json"


def stream(manifest, rank=0, world=1, micro=4, accum=1, seed=0, **kw):
    return ShardStream(manifest=read_manifest(manifest) if manifest else None, rank=rank, world=world,
                       micro=micro, accum=accum, seed=seed, crop=16, scale=(0.5, 1.0), hflip=True,
                       shuffle_buffer=8, **kw)


def read_epoch(ds, epoch, workers=2, step=0, earlier=()):
    """The solid_index of every crop a rank gives from `step` on, batch by batch."""
    ds.set_position(epoch, step, earlier)
    loader = DataLoader(ds, batch_size=ds.micro, num_workers=workers)
    return [[solid_index(img) for img in batch] for batch in loader]


def read_flat(ds, epoch, step=0, earlier=(), workers=2) -> list[int]:
    """read_epoch's indices in one list."""
    return [i for batch in read_epoch(ds, epoch, workers, step, earlier) for i in batch]


class PoisonedFrom:
    """Fault injection around a real task: the loss of micro-batch `first` (counting from 1) and
    of the `count` - 1 after it is multiplied by NaN, on this rank when `here`."""

    def __init__(self, task, first: int, count: int = 1, here: bool = True):
        self.task, self.first, self.count, self.here, self.calls = task, first, count, here, 0

    def loss(self, engine, batch, phases=None):
        self.calls += 1
        loss = self.task.loss(engine, batch)
        poisoned = self.here and self.first <= self.calls < self.first + self.count
        return loss * float("nan") if poisoned else loss

    def __getattr__(self, name):
        return getattr(self.task, name)
