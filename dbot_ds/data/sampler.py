"""Epoch order and resume position: every rank gets the same number of batches, and a resumed
epoch continues with exactly the samples not yet seen."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from dbot_ds.seeding import derive_seed


class EpochSampler(Sampler):
    """Yields (epoch, index) keys for one rank.

    Each epoch is a permutation seeded by (seed, epoch), cut to whole global batches and laid
    out [step, accumulation, rank, micro]; a rank reads its slice from `start_micro` on.
    """

    def __init__(self, n: int, *, rank: int, world: int, micro: int, accum: int, seed: int):
        self.n, self.rank, self.world, self.micro, self.accum, self.seed = n, rank, world, micro, accum, seed
        self.steps_per_epoch = n // (micro * accum * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {n} samples, fewer than one global batch "
                             f"({micro * accum * world}); lower batch.global_batch or add data")
        self.epoch, self.start_micro = 0, 0

    def set_position(self, epoch: int, step_in_epoch: int = 0, earlier=()) -> None:
        """`earlier` layouts need no account: a step's samples are the same however many ranks
        read them (the order is laid out [step, accumulation, rank, micro])."""
        self.epoch, self.start_micro = epoch, step_in_epoch * self.accum

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """[steps * accum, micro] indices this rank reads in `epoch`."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch-order", epoch))
        order = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.accum * self.world * self.micro]
        return order.view(-1, self.world, self.micro)[:, self.rank]

    def __iter__(self):
        for i in self.epoch_indices(self.epoch)[self.start_micro:].flatten().tolist():
            yield self.epoch, i

    def __len__(self) -> int:
        return (self.steps_per_epoch * self.accum - self.start_micro) * self.micro
