"""Data: in-memory generated images or streamed WebDataset shards, with exact epoch positions.

Both sources expose the same position interface (`steps_per_epoch`, `set_position(epoch,
step_in_epoch)`), which is what the training loop and its checkpoints see; prefetch.py turns
their batches into normalised images on the device.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import braceexpand
import torch
from torch.utils.data import DataLoader

from dbot_ds.config import RunConfig
from dbot_ds.distributed import barrier
from dbot_ds.data.device_decode import collate_jpegs
from dbot_ds.data.sampler import EpochSampler
from dbot_ds.data.shard_loader import ShardStream
from dbot_ds.data.shards import read_manifest
from dbot_ds.data.synthetic import SyntheticImages, write_generated_imagefolder


def generated_shards(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the generated image set as JPEGs and convert it to shards (once per run dir)."""
    from data_tools.convert import convert
    from data_tools.sources import imagefolder

    manifest = run_dir / "data" / "shards" / "manifest.json"
    if not manifest.is_file():
        manifest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=manifest.parent.parent) as images:  # gone once converted
            write_generated_imagefolder(images, cfg.data.synthetic_images, generated_size(cfg), cfg.seed)
            items, classes = imagefolder(images)
            convert(items, classes, manifest.parent, seed=cfg.seed, shard_size=256, progress=False)
    return manifest


def generated_size(cfg: RunConfig) -> int:
    """Side of the generated images: data.synthetic_size, else 5/4 of the crop (room to crop)."""
    return cfg.data.synthetic_size or cfg.model.img_size * 5 // 4


def build_data(cfg: RunConfig, *, rank: int, world: int, accum: int, run_dir: Path):
    """-> (DataLoader of uint8 [micro, 3, H, W] batches, its position: EpochSampler | ShardStream)."""
    d = cfg.data
    common = dict(rank=rank, world=world, micro=cfg.batch.micro_batch, accum=accum, seed=cfg.seed)
    workers = d.num_workers
    loader_kw = dict(batch_size=cfg.batch.micro_batch, num_workers=workers,
                     pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                     prefetch_factor=4 if workers > 0 else None)
    if d.source == "synthetic":
        dataset = SyntheticImages(d.synthetic_images, generated_size(cfg), cfg.model.img_size, d.crop_scale,
                                  d.hflip, cfg.seed, d.color_jitter)
        sampler = EpochSampler(len(dataset), **common)
        return DataLoader(dataset, sampler=sampler, **loader_kw), sampler
    if d.source == "generated_shards":
        if rank == 0:
            generated_shards(cfg, run_dir)
        barrier()
        source = str(run_dir / "data" / "shards" / "manifest.json")
    else:
        source = d.shards
    if source.endswith(".json"):
        where = {"manifest": read_manifest(source)}
    else:
        where = {"urls": [u for part in source.split("::") for u in braceexpand.braceexpand(part)]}
    stream = ShardStream(**where, epoch_samples=d.epoch_samples or None, **common,
                         crop=cfg.model.img_size, scale=d.crop_scale, hflip=d.hflip, decode=d.decode,
                         jitter=d.color_jitter,
                         shuffle_buffer=d.shuffle_buffer, max_bad_fraction=d.max_bad_fraction)
    if d.decode == "device":  # encoded bytes, read by the decoder from host memory: nothing to pin
        loader_kw.update(collate_fn=collate_jpegs, pin_memory=False)
    return DataLoader(stream, **loader_kw), stream


__all__ = ["build_data", "EpochSampler", "ShardStream"]
