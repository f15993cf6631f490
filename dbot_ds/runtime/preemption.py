"""Preemption: a signal or a stop file asks every rank to checkpoint and exit at the same step.

Slurm sends USR1 (`#SBATCH --signal=B:USR1@N`) to the batch shell, whose trap touches the file
named by DBOT_STOP_FILE; a USR1/TERM delivered to the trainer itself also counts. Ranks agree
through an all-reduce whose result is copied to the host asynchronously at one poll and read at
the next, so the check never stalls the step on a host synchronisation.
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
        self.previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def close(self) -> None:
        """Give the signals back to whoever handled them before this run."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

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
            done, host = self.pending
            done.synchronize()  # recorded a poll interval ago: long finished, no stall
            decided = bool(host.item())
        flag = torch.full((1,), int(self.local()), device=self.device)  # a fill: no blocking host copy
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # enqueued on the stream; the host does not wait
        if flag.is_cuda:
            host = torch.empty(1, dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = flag, _Done()
        self.pending = (done, host)
        return decided


class _Done:
    """A finished 'event' for CPU tensors (gloo's all-reduce has already completed)."""

    def synchronize(self) -> None:
        pass
