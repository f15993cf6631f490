"""Which sample positions of an epoch each rank and loader worker reads, and which remain after
part of the epoch was read by another layout (another number of ranks or workers).

An epoch of shards is one sequence of positions (its shards concatenated in the epoch's seeded
order); the first steps_per_epoch x global batch of them are read. A layout (world, workers)
gives rank r the r-th contiguous share of the positions still to read, and each of its worker
slots a contiguous part of that share holding a whole number of micro-batches; the DataLoader
takes batch i from slot i mod workers, each slot reading its positions through a seeded shuffle
buffer. Resumed under the same layout, each slot skips the batches it had given. Resumed under
another, the positions the earlier layouts gave out are replayed (the shuffles are of positions,
no data is read) and the new layout shares out exactly the rest.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Sequence

from dbot_ds.seeding import derive_seed


@dataclasses.dataclass(frozen=True)
class Layout:
    """A process group's reading of part of an epoch: `steps` optimizer steps by `world` ranks of
    `workers` loader workers each."""
    world: int
    workers: int
    steps: int


def slot_batches(slot: int, workers: int, total_batches: int, start: int = 0) -> int:
    """Micro-batches of round-robin slot `slot` among batch indices [start, total)."""
    return len(range(slot, total_batches, workers)) - len(range(slot, start, workers))


def slot_span(share: Sequence[int], slot: int, workers: int, batches: int, micro: int) -> Sequence[int]:
    """The part of a rank's share (`batches` micro-batches) that worker slot `slot` reads."""
    before = sum(slot_batches(s, workers, batches) for s in range(slot)) * micro
    return share[before: before + slot_batches(slot, workers, batches) * micro]


def shuffled(stream, size: int, rng: random.Random):
    """A seeded shuffle buffer (deterministic given the stream's order and rng, whatever the items)."""
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


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    steps_per_epoch: int
    global_batch: int
    micro: int
    seed: int
    shuffle_buffer: int

    def accum(self, world: int) -> int:
        return self.global_batch // (self.micro * world)

    def buffer_rng(self, epoch: int, rank: int, slot: int) -> random.Random:
        return random.Random(derive_seed(self.seed, "buffer", epoch, rank, slot))

    def remaining(self, epoch: int, earlier: Sequence[Layout]) -> Sequence[int]:
        """The epoch's positions no earlier layout gave out, in order."""
        left: Sequence[int] = range(self.steps_per_epoch * self.global_batch)
        done = 0
        for layout in earlier:
            batches = (self.steps_per_epoch - done) * self.accum(layout.world)
            per_rank, given = batches * self.micro, set()
            for rank, slot in itertools.product(range(layout.world), range(layout.workers)):
                span = slot_span(left[rank * per_rank: (rank + 1) * per_rank], slot, layout.workers, batches, self.micro)
                n = len(range(slot, layout.steps * self.accum(layout.world), layout.workers)) * self.micro
                given.update(itertools.islice(shuffled(iter(span), self.shuffle_buffer,
                                                       self.buffer_rng(epoch, rank, slot)), n))
            left = [p for p in left if p not in given]
            done += layout.steps
        return left

    def share(self, epoch: int, earlier: Sequence[Layout], world: int, rank: int) -> tuple[Sequence[int], int]:
        """(rank `rank`'s positions under a layout of `world` ranks that follows `earlier`, and
        how many micro-batches they make)."""
        done = sum(layout.steps for layout in earlier)
        batches = (self.steps_per_epoch - done) * self.accum(world)
        per_rank = batches * self.micro
        left = self.remaining(epoch, earlier)
        return left[rank * per_rank: (rank + 1) * per_rank], batches
