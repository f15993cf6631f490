"""Data: datasets, the epoch sampler and the loader (shared with data_tools for shard formats)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from dbot_ds.config import RunConfig
from dbot_ds.data.sampler import EpochSampler
from dbot_ds.data.synthetic import SyntheticImages
from dbot_ds.data.transforms import normalize_on_device


def build_dataset(cfg: RunConfig) -> Dataset:
    d = cfg.data
    size = d.synthetic_size or cfg.model.img_size * 5 // 4
    return SyntheticImages(d.synthetic_images, size, cfg.model.img_size, d.crop_scale, d.hflip, cfg.seed)


def build_loader(dataset: Dataset, sampler: EpochSampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=sampler.micro, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      drop_last=False)


__all__ = ["build_dataset", "build_loader", "EpochSampler", "normalize_on_device"]
