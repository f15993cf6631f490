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

Bad data: a sample that cannot be read keeps its position in the raw stream (a LOST stand-in,
counted once) and its crop is replaced by the last good one, so the seeded shuffles, and so every
resume, see the same positions as an uninterrupted read.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import random
from typing import Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dbot_ds.data.device_decode import jpeg_sample
from dbot_ds.data.epoch_plan import EpochPlan, Layout, shuffled, slot_batches, slot_span
from dbot_ds.data.shards import IMAGE_KEY, Manifest, ShardError, is_url
from dbot_ds.data.tar_samples import iter_shard_samples
from dbot_ds.data.transforms import UnreadableImage, decode_crop
from dbot_ds.seeding import derive_seed

log = logging.getLogger("dbot_ds.data")
MAX_LAYOUTS = 8  # layouts one epoch may be read in (each resume on another number of ranks or workers)


@dataclasses.dataclass(frozen=True)
class Piece:
    url: str
    start: int  # first sample of the shard to read
    stop: int   # one past the last
    keep: frozenset[int] | None = None  # of those, only these (the rest of an epoch read in two layouts)

    def wanted(self, i: int) -> bool:
        return self.start <= i < self.stop and (self.keep is None or i in self.keep)

    def left_from(self, i: int) -> int:
        """Samples still to read from sample i on."""
        if self.keep is None:
            return self.stop - max(i, self.start)
        return sum(1 for k in self.keep if k >= i)


def cut(shards: list[tuple[str, int]], begin: int, end: int) -> list[Piece]:
    """The pieces of the concatenation of `shards` (url, samples) covering positions [begin, end)."""
    pieces, offset = [], 0
    for url, n in shards:
        lo, hi = max(begin, offset), min(end, offset + n)
        if lo < hi:
            pieces.append(Piece(url, lo - offset, hi - offset))
        offset += n
    return pieces


def pieces_of(shards: list[tuple[str, int]], positions: Sequence[int]) -> list[Piece]:
    """The pieces holding `positions` (ascending) of the concatenation of `shards`."""
    if isinstance(positions, range) and positions.step == 1:
        return cut(shards, positions.start, positions.stop)
    pieces, offset, i = [], 0, 0
    for url, n in shards:
        j = bisect.bisect_left(positions, offset + n, lo=i)
        if j > i:
            mine = [p - offset for p in positions[i:j]]
            whole = mine[-1] - mine[0] + 1 == len(mine)
            pieces.append(Piece(url, mine[0], mine[-1] + 1, None if whole else frozenset(mine)))
        i, offset = j, offset + n
    return pieces


class ShardStream(IterableDataset):
    def __init__(self, *, manifest: Manifest | None = None, urls: list[str] | None = None,
                 epoch_samples: int | None = None, rank: int, world: int, micro: int, accum: int,
                 seed: int, crop: int, scale: tuple[float, float], hflip: bool,
                 shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01, decode: str = "cpu",
                 jitter: float = 0.0, sample_fn=None, verify: str = "size", pipe_urls: bool = False):
        if manifest is None and not epoch_samples:
            raise ShardError("shards without a manifest stream in resampled mode and need "
                             "data.epoch_samples (or make a manifest: dbot-ds shards index)")
        self.manifest, self.urls = manifest, urls or (manifest.urls(pipe_urls) if manifest else [])
        self.infos = dict(zip(self.urls, manifest.shards)) if manifest else {}
        # "size": a stat per shard opened; "sha256": also hashed as it streams, its samples held
        # until the hash is known (memory: one piece, up to a shard's samples, per loader worker)
        self.verify = verify
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
        self.plan = EpochPlan(self.steps_per_epoch, micro * accum * world, micro, seed, shuffle_buffer)
        # the position, shared with persistent workers: epoch, micro-batches this layout has given,
        # and the layouts that read the epoch's first steps (world, workers, steps each)
        self._epoch = multiprocessing.Value("q", 0)
        self._start = multiprocessing.Value("q", 0)
        self._earlier = multiprocessing.Array("q", 3 * MAX_LAYOUTS)
        self._n_earlier = multiprocessing.Value("q", 0)

    # the same interface as EpochSampler
    def set_position(self, epoch: int, step_in_epoch: int = 0, earlier: Sequence[Layout] = ()) -> None:
        """Read epoch `epoch` from step `step_in_epoch` on; `earlier`: the layouts (other numbers
        of ranks or workers) that read its first steps, whose samples are not read again."""
        if len(earlier) > MAX_LAYOUTS:
            raise ShardError(f"an epoch read by more than {MAX_LAYOUTS} layouts: finish it on one")
        done = sum(layout.steps for layout in earlier)
        self._epoch.value, self._start.value = epoch, (step_in_epoch - done) * self.accum
        self._n_earlier.value = len(earlier)
        for i, layout in enumerate(earlier):
            self._earlier[3 * i: 3 * i + 3] = [layout.world, layout.workers, layout.steps]

    def earlier(self) -> tuple[Layout, ...]:
        return tuple(Layout(*self._earlier[3 * i: 3 * i + 3]) for i in range(self._n_earlier.value))

    def layout_batches(self) -> int:
        """Micro-batches per rank this layout reads of the epoch: what the earlier ones left."""
        return (self.steps_per_epoch - sum(layout.steps for layout in self.earlier())) * self.accum

    def __len__(self) -> int:
        return (self.layout_batches() - self._start.value) * self.micro

    def epoch_shards(self, epoch: int) -> list[tuple[str, int]]:
        order = torch.randperm(len(self.manifest.shards),
                               generator=torch.Generator().manual_seed(derive_seed(self.seed, "shards", epoch)))
        return [(self.urls[i], self.manifest.shards[i].samples) for i in order.tolist()]

    def raw_samples(self, epoch: int, slot: int, pieces: list[Piece], quota: int, bad: "BadCounter"):
        """Undecoded samples of this slot in file order. In exact mode every wanted position gives
        one item, a LOST where it could not be read (counted as bad here), so the shuffle buffer
        sees the positions EpochPlan replays on a resume in another layout."""
        if self.exact:
            for piece in pieces:
                yield from self.piece_samples(piece, bad)
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

    def piece_samples(self, piece: Piece, bad: "BadCounter"):
        """The piece's wanted samples, a LOST for each one lost: a shard whose size differs from
        the manifest's loses all of them, a broken tar those from where it breaks. With
        data.verify=sha256 the piece's samples are held until the shard's hash is known (memory:
        one piece per loader worker) and all of them are lost when it differs."""
        info = self.infos[piece.url]
        problem = wrong_size(piece.url, info.bytes)
        if problem:
            yield from lost(piece.left_from(0), problem, bad)
        elif self.verify == "sha256":
            digest = hashlib.sha256()
            held, (_, problem) = collect(scan(piece, digest))
            if problem is None and digest.hexdigest() != info.sha256:
                problem = f"{piece.url}: sha256 differs from the manifest's"
            if problem:
                yield from lost(piece.left_from(0), problem, bad)  # none of it is trusted
            else:
                yield from held
        else:
            seen, problem = yield from scan(piece)
            if problem:
                yield from lost(piece.left_from(seen), problem, bad)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start = self._epoch.value, self._start.value
        if self.exact:  # this rank's positions under this layout, after the earlier ones
            share, batches = self.plan.share(epoch, self.earlier(), self.world, self.rank)
        else:
            share, batches = range(0), self.layout_batches()
        slot = (worker + start) % workers  # keeps the loader's round-robin order across a resume
        first = len(range(slot, start, workers))  # this slot's batches already consumed
        remaining = slot_batches(slot, workers, batches, start)
        quota = (first + remaining) * self.micro
        pieces = pieces_of(self.epoch_shards(epoch), slot_span(share, slot, workers, batches, self.micro)) \
            if self.exact else []
        bad = BadCounter(quota, self.max_bad_fraction, f"rank {self.rank} worker {worker}")
        stream = shuffled(self.raw_samples(epoch, slot, pieces, quota, bad), self.shuffle_buffer,
                          self.plan.buffer_rng(epoch, self.rank, slot))
        yield from self.decoded(stream, skip=first * self.micro, count=remaining * self.micro,
                                epoch=epoch, slot=slot, bad=bad)

    def decoded(self, stream, *, skip: int, count: int, epoch: int, slot: int, bad: "BadCounter"):
        """Skip `skip` raw samples, then yield `count` crops, one per raw sample: a lost or bad
        one is replaced by the last good one (or, before the first, by the next good one), so
        every rank keeps the same number of batches and a resume that skips by raw position
        lands where this run stood."""
        last, owed, given = None, 0, 0
        for index, sample in enumerate(stream):
            if index >= skip + count:
                break
            if index < skip:
                continue
            item = self.item(sample, epoch, slot, index, bad)
            if item is None and last is None:
                owed += 1  # nothing to stand in yet: the next good sample fills this slot too
                continue
            last = last if item is None else item
            for _ in range(owed + 1):
                yield last
            given, owed = given + owed + 1, 0
        if given < count:  # the stream ran short (resampled mode) or held nothing readable
            if last is None:
                raise ShardError(f"rank {self.rank}: no readable sample in this worker's shards")
            for _ in range(count - given):
                yield last

    def item(self, sample, epoch: int, slot: int, index: int, bad: "BadCounter"):
        """The crop (or sample_fn's item) of raw sample `index`, or None when it is lost or bad."""
        if sample is LOST:
            return None  # counted where it was lost
        rng = random.Random(derive_seed(self.seed, "crop", epoch, self.rank, slot, index))
        try:
            if IMAGE_KEY not in sample:
                raise UnreadableImage(f"no {IMAGE_KEY}")
            return self.sample_fn(sample, rng) if self.sample_fn else self.prepare(sample[IMAGE_KEY], rng)
        except UnreadableImage as e:  # bad data; any other exception is a bug, and surfaces
            bad.add(1, f"{sample.get('__url__')}:{sample.get('__key__')}: {e}")
            return None

    def prepare(self, data: bytes, rng: random.Random):
        if self.decode == "device":
            return jpeg_sample(data, self.scale, self.hflip, rng)
        return decode_crop(data, self.crop, self.scale, self.hflip, rng, self.jitter)


class Lost:
    """A wanted sample that could not be read (counted as bad where that was found): it keeps
    its position in the raw stream."""

    def __repr__(self) -> str:
        return "LOST"


LOST = Lost()


def scan(piece: Piece, digest=None):
    """Yields the piece's readable wanted samples in file order; returns (samples of the shard
    read, what went wrong or None). With a digest the shard is read to its end (the hash needs
    every byte)."""
    seen = 0
    try:
        with contextlib.closing(iter_shard_samples(piece.url, digest)) as samples:
            for sample in samples:
                if seen >= piece.stop and digest is None:
                    break
                if piece.wanted(seen):
                    yield sample
                seen += 1
    except Exception as e:
        return seen, f"{piece.url}: unreadable after sample {seen} ({type(e).__name__}: {e})"
    if seen < piece.stop:  # a truncated tar can simply end early
        return seen, f"{piece.url}: unreadable after sample {seen} (ends early: truncated?)"
    return seen, None


def collect(generator) -> tuple[list, object]:
    """(everything a generator yields, what it returns)."""
    items = []
    while True:
        try:
            items.append(next(generator))
        except StopIteration as stop:
            return items, stop.value


def lost(n: int, problem: str, bad: "BadCounter"):
    """Count n wanted samples as bad (once, here) and keep their places with LOST."""
    bad.add(n, problem)
    for _ in range(n):
        yield LOST


def wrong_size(url: str, expected: int) -> str | None:
    """What is wrong with a local shard's size (one stat), or None; URLs are not checked."""
    if is_url(url):
        return None
    try:
        size = os.stat(url).st_size
    except OSError as e:
        return f"{url}: {e.strerror}"
    return None if size == expected else f"{url}: {size} bytes, the manifest says {expected} (truncated or replaced?)"


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
