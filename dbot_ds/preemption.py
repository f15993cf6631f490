"""Preemption: a signal or a stop file asks every rank to checkpoint and exit at the same step.

Slurm sends USR1 (`#SBATCH --signal=B:USR1@N`) to the batch shell, whose trap touches the file
named by DBOT_STOP_FILE; a USR1/TERM delivered to the trainer itself also counts. Ranks agree
through an all-reduce launched at one poll and read at the next, so the check never stalls the
step on a host synchronisation.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP_FILE_ENV = "DBOT_STOP_FILE"


class StopSignal:
    def __init__(self, device: torch.device):
        self.device = device
        self.stop_file = os.environ.get(STOP_FILE_ENV)
        self.signalled = False
        self.pending = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        return self.signalled or bool(self.stop_file and os.path.exists(self.stop_file))

    def poll(self) -> bool:
        """True once every rank has seen the request (decided on the previous poll's reduce)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.local()
        decided = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            decided = bool(flag.item())
        flag = torch.tensor([int(self.local())], device=self.device)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True), flag)
        return decided
