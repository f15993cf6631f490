"""Rank and world size from the launcher's environment, in one place (no deepspeed import)."""

from __future__ import annotations

import dataclasses
import os
import socket

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_from_env(env=os.environ) -> World:
    """torchrun / deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK), else Slurm tasks, else 1."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        return World(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                     int(env["SLURM_NTASKS"]))
    return World(0, 0, 1)


def export_rendezvous_env(world: World) -> None:
    """Make the env that torch.distributed's env:// init needs. A single process rendezvouses
    on a free loopback port: nothing listens beyond this machine."""
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(world.size))
    if world.size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def barrier() -> None:
    """All ranks meet here; nothing to wait for in a single process without a group."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t) -> None:
    """Sum a tensor over every rank, in place; nothing to do in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


def from_rank0(obj):
    """Rank 0's `obj` on every rank (a pickled broadcast); the object itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def dist_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def dist_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
