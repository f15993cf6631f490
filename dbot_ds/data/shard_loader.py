"""Streaming WebDataset shards with exact epoch accounting.

Exact mode (a manifest gives every shard's sample count): each epoch the shards are shuffled by
(seed, epoch) and concatenated; the first steps_per_epoch x global_batch positions are cut into
one contiguous block per rank, and each rank's block into one slice per loader worker holding a
whole number of micro-batches. So every rank yields the same number of batches whatever the
shard sizes, and every sample is read at most once per epoch (exactly once when the set is a
multiple of the global batch). Workers shuffle with a buffer seeded by (seed, epoch, rank, slot).

Resampled mode (a pattern or `pipe:` URLs, no manifest): each worker draws shards with
replacement from its seeded RNG until its quota of data.epoch_samples / world is met.

Resume: the position is the number of micro-batches this rank consumed in the epoch; every
worker skips its share of them without decoding, and the workers' roles rotate so the loader's
round-robin order continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import random

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dbot_ds.data.device_decode import jpeg_sample
from dbot_ds.data.shards import IMAGE_KEY, Manifest, ShardError
from dbot_ds.data.tar_samples import iter_shard_samples
from dbot_ds.data.transforms import decode_crop
from dbot_ds.seeding import derive_seed

log = logging.getLogger("dbot_ds.data")


@dataclasses.dataclass(frozen=True)
class Piece:
    url: str
    start: int  # first sample of the shard to read
    stop: int   # one past the last


def cut(shards: list[tuple[str, int]], begin: int, end: int) -> list[Piece]:
    """The pieces of the concatenation of `shards` (url, samples) covering positions [begin, end)."""
    pieces, offset = [], 0
    for url, n in shards:
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            pieces.append(Piece(url, lo - offset, hi - offset))
        offset += n
    return pieces


def slot_batches(slot: int, workers: int, total_batches: int, start: int = 0) -> int:
    """Micro-batches of round-robin slot `slot` among batch indices [start, total)."""
    return len(range(slot, total_batches, workers)) - len(range(slot, start, workers))


class ShardStream(IterableDataset):
    def __init__(self, *, manifest: Manifest | None = None, urls: list[str] | None = None,
                 epoch_samples: int | None = None, rank: int, world: int, micro: int, accum: int,
                 seed: int, crop: int, scale: tuple[float, float], hflip: bool,
                 shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01, decode: str = "cpu",
                 jitter: float = 0.0, sample_fn=None):
        if manifest is None and not epoch_samples:
            raise ShardError("shards without a manifest stream in resampled mode and need "
                             "data.epoch_samples (or make a manifest: dbot-ds shards index)")
        self.manifest, self.urls = manifest, urls or (manifest.urls() if manifest else [])
        self.exact = manifest is not None and not epoch_samples
        self.rank, self.world, self.micro, self.accum, self.seed = rank, world, micro, accum, seed
        self.crop, self.scale, self.hflip, self.jitter = crop, scale, hflip, jitter
        self.shuffle_buffer, self.max_bad_fraction = shuffle_buffer, max_bad_fraction
        self.decode = decode  # "cpu": uint8 crops; "device": JPEG bytes + crop boxes (device_decode)
        self.sample_fn = sample_fn  # (raw sample dict, rng) -> item; replaces the crop (fine-tuning)
        total = manifest.total if self.exact else epoch_samples
        self.steps_per_epoch = total // (micro * accum * world)
        if self.steps_per_epoch == 0:
            raise ShardError(f"{total} samples per epoch are fewer than one global batch "
                             f"({micro * accum * world})")
        self.batches_per_epoch = self.steps_per_epoch * accum  # micro-batches per rank
        self._epoch = multiprocessing.Value("q", 0)  # shared with persistent workers
        self._start = multiprocessing.Value("q", 0)

    # the same interface as EpochSampler
    def set_position(self, epoch: int, step_in_epoch: int = 0) -> None:
        self._epoch.value, self._start.value = epoch, step_in_epoch * self.accum

    def __len__(self) -> int:
        return (self.batches_per_epoch - self._start.value) * self.micro

    def epoch_shards(self, epoch: int) -> list[tuple[str, int]]:
        order = torch.randperm(len(self.manifest.shards),
                               generator=torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch)))
        return [(self.urls[i], self.manifest.shards[i].samples) for i in order.tolist()]

    def slot_pieces(self, epoch: int, slot: int, workers: int) -> list[Piece]:
        per_rank = self.batches_per_epoch * self.micro
        rank_begin = self.rank * per_rank
        before = sum(slot_batches(s, workers, self.batches_per_epoch) for s in range(slot)) * self.micro
        mine = slot_batches(slot, workers, self.batches_per_epoch) * self.micro
        return cut(self.epoch_shards(epoch), rank_begin + before, rank_begin + before + mine)

    def raw_samples(self, epoch: int, slot: int, workers: int, quota: int, bad: "BadCounter"):
        """Undecoded samples of this slot in file order; a broken tar counts its rest as bad."""
        if self.exact:
            for piece in self.slot_pieces(epoch, slot, workers):
                seen = 0
                try:
                    for sample in iter_shard_samples(piece.url):
                        if seen >= piece.stop:
                            break
                        if seen >= piece.start:
                            yield sample
                        seen += 1
                except Exception as e:
                    bad.add(piece.stop - max(seen, piece.start),
                            f"{piece.url}: unreadable after sample {seen} ({type(e).__name__}: {e})")
                    continue
                if seen < piece.stop:  # a truncated tar can simply end early
                    bad.add(piece.stop - max(seen, piece.start),
                            f"{piece.url}: unreadable after sample {seen} (ends early: truncated?)")
            return
        rng = random.Random(derive_seed(self.seed, "resample", epoch, self.rank, slot))
        produced = 0
        while produced < quota:
            url = rng.choice(self.urls)
            try:
                for sample in iter_shard_samples(url):
                    yield sample
                    produced += 1
                    if produced >= quota:
                        return
            except Exception as e:
                bad.add(1, f"{url}: unreadable ({type(e).__name__}: {e})")

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = self._epoch.value, self._start.value
        slot = (worker + start) % workers  # keeps the loader's round-robin order across a resume
        first = len(range(slot, start, workers))  # this slot's batches already consumed
        remaining = slot_batches(slot, workers, self.batches_per_epoch, start)
        quota = (first + remaining) * self.micro
        bad = BadCounter(quota, self.max_bad_fraction, f"rank {self.rank} worker {worker}")
        rng = random.Random(derive_seed(self.seed, "buffer", epoch, self.rank, slot))
        stream = shuffled(self.raw_samples(epoch, slot, workers, quota, bad), self.shuffle_buffer, rng)
        yield from self.decoded(stream, skip=first * self.micro, count=remaining * self.micro,
                                epoch=epoch, slot=slot, bad=bad)

    def decoded(self, stream, *, skip: int, count: int, epoch: int, slot: int, bad: "BadCounter"):
        """Skip `skip` raw samples, then yield `count` crops; a bad sample is replaced by the
        last good one so every rank keeps the same number of batches."""
        last, index = None, 0
        for sample in stream:
            if index >= skip + count:
                return
            if index < skip:
                index += 1
                continue
            rng = random.Random(derive_seed(self.seed, "crop", epoch, self.rank, slot, index))
            try:
                last = self.sample_fn(sample, rng) if self.sample_fn else self.prepare(sample[IMAGE_KEY], rng)
            except Exception as e:
                bad.add(1, f"{sample.get('__url__')}:{sample.get('__key__')}: "
                        f"{'no ' + IMAGE_KEY if IMAGE_KEY not in sample else type(e).__name__ + ': ' + str(e)}")
                if last is None:
                    continue  # nothing to stand in yet: the next good sample fills the gap
            yield last
            index += 1
        if index < skip + count:  # the stream ran short (broken shards): pad with the last good one
            if last is None:
                raise ShardError(f"rank {self.rank}: no readable sample in this worker's shards")
            for _ in range(skip + count - max(index, skip)):
                yield last


    def prepare(self, data: bytes, rng: random.Random):
        if self.decode == "device":
            return jpeg_sample(data, self.scale, self.hflip, rng)
        return decode_crop(data, self.crop, self.scale, self.hflip, rng, self.jitter)


class BadCounter:
    def __init__(self, total: int, max_fraction: float, where: str):
        self.count, self.limit, self.where = 0, max_fraction * total, where
        self.max_fraction = max_fraction

    def add(self, n: int, what: str) -> None:
        if n <= 0:
            return
        self.count += n
        log.warning("%s: skipped %d bad sample(s) (%d so far): %s", self.where, n, self.count, what)
        if self.count > self.limit:
            raise ShardError(f"{self.where}: {self.count} bad samples exceed data.max_bad_fraction "
                             f"{self.max_fraction}; last: {what}. Check the shards with "
                             "`dbot-ds shards verify`, or raise data.max_bad_fraction")


def shuffled(stream, size: int, rng: random.Random):
    """A seeded shuffle buffer (deterministic given the stream and rng)."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer
