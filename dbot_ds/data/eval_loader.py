"""Labelled, deterministic reading of a shard set for evaluation: every sample once, in
manifest order, resized (short side) and centre-cropped; uint8 images and integer labels."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dbot_ds.data.shards import IMAGE_KEY, LABEL_KEY, read_manifest
from dbot_ds.data.tar_samples import iter_shard_samples


def center_crop(data: bytes, size: int, crop_ratio: float = 0.875) -> torch.Tensor:
    """Resize the short side to size / crop_ratio, centre-crop size x size: uint8 [3, size, size]."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    short = round(size / crop_ratio)
    scale = short / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    arr = np.array(img.crop((left, top, left + size, top + size)))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class LabelledShards(IterableDataset):
    """Shard i goes to (rank, worker) slot i mod (world x workers): every sample once overall."""

    def __init__(self, manifest_path: str, size: int, rank: int = 0, world: int = 1, pipe_urls: bool = False):
        self.manifest, self.size, self.rank, self.world = read_manifest(manifest_path), size, rank, world
        self.urls = self.manifest.urls(pipe_urls)

    def __len__(self) -> int:
        return self.manifest.total

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        slot, slots = self.rank * workers + worker, self.world * workers
        for i, url in enumerate(self.urls):
            if i % slots == slot:
                for s in iter_shard_samples(url):
                    yield center_crop(s[IMAGE_KEY], self.size), int(s[LABEL_KEY])


def labelled_loader(manifest_path: str, size: int, batch: int = 256, workers: int = 4,
                    rank: int = 0, world: int = 1, pipe_urls: bool = False) -> DataLoader:
    return DataLoader(LabelledShards(manifest_path, size, rank, world, pipe_urls), batch_size=batch, num_workers=workers,
                      pin_memory=torch.cuda.is_available())
