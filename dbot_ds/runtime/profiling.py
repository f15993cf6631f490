"""Profiling a window of optimizer steps (profile.steps=A:B): a torch.profiler trace per rank in
<run>/profile (TensorBoard's profiler plugin and Perfetto read it), the step's phases named
dbot_ds.<phase>; on CUDA with profile.memory, a memory snapshot of the same steps
(pytorch.org/memory_viz reads it)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch


def named_phases(name: str):
    """The step's `phases`, as labelled ranges in the trace."""
    return torch.profiler.record_function(f"dbot_ds.{name}")


class StepProfiler:
    def __init__(self, window: tuple[int, int] | None, memory: bool, out: Path, rank: int, device: torch.device):
        self.window, self.memory, self.out, self.rank = window, memory, out, rank
        self.cuda = device.type == "cuda"
        self.profiler = None
        if memory and window and not self.cuda:
            warnings.warn("profile.memory takes a CUDA memory snapshot: no CUDA device here, skipped")
            self.memory = False

    @property
    def active(self) -> bool:
        return self.profiler is not None

    def phases(self):
        return named_phases if self.active else None

    def before(self, global_step: int) -> None:
        """Called before the optimizer step that will make `global_step` + 1 steps (a resume or a
        new stage may start inside the window)."""
        if self.window and self.window[0] <= global_step < self.window[1] and self.profiler is None:
            self.out.mkdir(parents=True, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                                  if self.cuda else [])
            self.profiler = torch.profiler.profile(
                activities=activities, on_trace_ready=torch.profiler.tensorboard_trace_handler(
                    str(self.out), worker_name=f"rank{self.rank}"))
            self.profiler.__enter__()
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=200_000)

    def after(self, global_step: int) -> None:
        """Called once `global_step` optimizer steps are done."""
        if self.profiler is not None and global_step >= self.window[1]:
            self.close()

    def close(self) -> None:
        if self.profiler is None:
            return
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(self.out / f"rank{self.rank}_memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.profiler.__exit__(None, None, None)
        self.profiler = None


@contextlib.contextmanager
def profiled(profiler: StepProfiler):
    try:
        yield profiler
    finally:
        profiler.close()
