"""The loader a training loop iterates: micro-batches ready on the device, from any optimizer
step on. It owns the position (epoch, step in epoch, from the step and steps_per_epoch) and the
prefetching (prefetch.py), so the loop asks only for `batches(start_step, stop_step)`.

Sources: generated `shapes` in memory (EpochSampler), or WebDataset shards (ShardStream:
exact epochs from a manifest, or resampled URLs); labelled shards with timm's fine-tuning
transform for classification, and centre crops of them, once each, for evaluation.
"""

from __future__ import annotations

from typing import Iterator

import braceexpand
import torch
from torch.utils.data import DataLoader

from dbot_ds.config import FinetuneConfig, RunConfig
from dbot_ds.data.device_decode import collate_jpegs
from dbot_ds.data.eval_loader import labelled_loader
from dbot_ds.data.generated import SyntheticImages
from dbot_ds.data.prefetch import DevicePrefetcher
from dbot_ds.data.sampler import EpochSampler
from dbot_ds.data.shard_loader import ShardStream
from dbot_ds.data.shards import read_manifest
from dbot_ds.data.transforms import ClassifySample, normalize_on_device


class ResumableLoader:
    def __init__(self, dataloader: DataLoader, position: EpochSampler | ShardStream, *, accum: int,
                 device: torch.device, dtype: torch.dtype, size: int, ahead: int = 2):
        self.dataloader, self.position, self.accum = dataloader, position, accum
        self.device, self.dtype, self.size, self.ahead = device, dtype, size, ahead

    @property
    def steps_per_epoch(self) -> int:
        return self.position.steps_per_epoch

    def batches(self, start_step: int, stop_step: int) -> Iterator[tuple[int, int, object]]:
        """(optimizer step, micro-step in it, batch on the device) for every micro-batch of the
        steps [start_step, stop_step), each epoch in its seeded order, resumed mid-epoch at the
        first unseen sample."""
        step = start_step
        while step < stop_step:
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            self.position.set_position(epoch, in_epoch)
            for i, batch in enumerate(DevicePrefetcher(self.dataloader, self.device, self.dtype, self.size, self.ahead)):
                yield step, i % self.accum, batch
                if (i + 1) % self.accum == 0:
                    step += 1
                    if step >= stop_step:
                        return


def _dataloader(dataset, micro: int, workers: int, pin: bool = True, **kw) -> DataLoader:
    return DataLoader(dataset, batch_size=micro, num_workers=workers, pin_memory=pin and torch.cuda.is_available(),
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, **kw)


def generated_size(cfg: RunConfig) -> int:
    """Side of the generated images: data.synthetic_size, else 5/4 of the crop (room to crop)."""
    return cfg.data.synthetic_size or cfg.model.img_size * 5 // 4


def shard_source(spec: str) -> dict:
    """A manifest.json (exact epochs), or brace patterns / `a::b` lists / pipe: URLs (resampled)."""
    if spec.endswith(".json"):
        return {"manifest": read_manifest(spec)}
    return {"urls": [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]}


def pretrain_loader(cfg: RunConfig, *, rank: int, world: int, accum: int, device: torch.device,
                    dtype: torch.dtype, shards: str | None = None) -> ResumableLoader:
    """The pre-training loader; `shards` replaces data.shards (the run's generated shards)."""
    d, micro = cfg.data, cfg.batch.micro_batch
    common = dict(rank=rank, world=world, micro=micro, accum=accum, seed=cfg.seed)
    place = dict(accum=accum, device=device, dtype=dtype, size=cfg.model.img_size)
    if d.source == "synthetic":
        dataset = SyntheticImages(d.synthetic_images, generated_size(cfg), cfg.model.img_size, d.crop_scale,
                                  d.hflip, cfg.seed, d.color_jitter)
        sampler = EpochSampler(len(dataset), **common)
        return ResumableLoader(_dataloader(dataset, micro, d.num_workers, sampler=sampler), sampler, **place)
    stream = ShardStream(**shard_source(shards or d.shards), epoch_samples=d.epoch_samples or None, **common,
                         crop=cfg.model.img_size, scale=d.crop_scale, hflip=d.hflip, decode=d.decode,
                         jitter=d.color_jitter, shuffle_buffer=d.shuffle_buffer, max_bad_fraction=d.max_bad_fraction)
    # device decode: encoded bytes, read by the decoder from host memory: nothing to pin
    extra = dict(collate_fn=collate_jpegs, pin=False) if d.decode == "device" else {}
    return ResumableLoader(_dataloader(stream, micro, d.num_workers, **extra), stream, **place)


def classify_loader(cfg: FinetuneConfig, *, size: int, rank: int, world: int, accum: int, device: torch.device,
                    dtype: torch.dtype) -> ResumableLoader:
    """Fine-tuning: labelled shards through timm's training transform, (images, labels) batches."""
    a = cfg.augment
    stream = ShardStream(manifest=read_manifest(cfg.data.train), rank=rank, world=world, micro=cfg.batch.micro_batch,
                         accum=accum, seed=cfg.seed, crop=size, scale=(0.08, 1.0), hflip=True,
                         sample_fn=ClassifySample(size, a.randaug, a.reprob, a.remode))
    # timm's transforms draw from the global generators: in this process (no workers) they must
    # run between the training steps, not on a prefetch thread beside them
    return ResumableLoader(_dataloader(stream, cfg.batch.micro_batch, cfg.data.num_workers), stream, accum=accum,
                           device=device, dtype=dtype, size=size, ahead=2 if cfg.data.num_workers else 0)


def labelled_batches(manifest: str, *, size: int, rank: int, world: int, workers: int, device: torch.device,
                     dtype: torch.dtype, batch: int = 128):
    """Evaluation: every sample of a labelled shard set once (this rank's share), centre-cropped,
    as (normalised images [B, 3, H, W] in dtype, labels [B]) on the device."""
    for imgs, labels in labelled_loader(manifest, size, batch=batch, workers=workers, rank=rank, world=world):
        yield normalize_on_device(imgs, device, dtype), labels.to(device, non_blocking=True)
