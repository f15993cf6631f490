"""Measuring a training step on any device: the device's datasheet peak, a timer that does
not synchronise inside the timed region, the host synchronisations a step makes, peak memory."""

from __future__ import annotations

import gc
import resource
import time
import warnings

import torch

from dbot_ds.runtime.engine import accelerator


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 datasheet peaks


def device_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class Timer:
    """Device events on GPUs, perf_counter on CPU; elapsed() synchronises once, at the end."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def elapsed(self) -> float:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b) / 1000
        return time.perf_counter() - self.t


class SyncCounter:
    """Counts explicit device synchronisations while active: torch.cuda.synchronize, CUDA
    Stream/Event.synchronize and DeepSpeed's accelerator.synchronize (what its throughput timer
    and ZeRO's gradient epilogue call; counted once where it goes through torch.cuda.synchronize).
    Calls that reach CUDA directly are not seen (nvJPEG's cudaStreamSynchronize, NCCL)."""

    def __init__(self):
        self.count, self._inside = 0, False
        self.targets = [(torch.cuda, "synchronize"), (torch.cuda.Stream, "synchronize"),
                        (torch.cuda.Event, "synchronize"), (accelerator(), "synchronize")]

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            outer = not self._inside
            self.count += outer
            self._inside = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside = not outer
        return counted

    def __enter__(self):
        self.saved = [(obj, name, getattr(obj, name)) for obj, name in self.targets]
        for obj, name, fn in self.saved:
            setattr(obj, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for obj, name, fn in self.saved:
            setattr(obj, name, fn)


def host_syncs(step_fn, device) -> dict:
    """Host synchronisations in one call of step_fn: `synchronize`, the explicit calls
    SyncCounter sees (on any device: DeepSpeed's accelerator calls them on CPU too); `tensor_ops`,
    the synchronising tensor operations torch's sync debug mode reports (.item(), blocking
    copies, nonzero), CUDA only (None elsewhere)."""
    with warnings.catch_warnings(record=True) as caught, SyncCounter() as explicit:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    ops = sum("synchronizing CUDA operation" in str(w.message) for w in caught) if device.type == "cuda" else None
    return {"synchronize": explicit.count, "tensor_ops": ops}


def reset_peak_memory(device) -> None:
    gc.collect()  # engines and graphed teachers hold reference cycles: free the last case's now
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device) -> tuple[float, float | None]:
    """(peak allocated, peak reserved by the caching allocator and CUDA-graph pools) in GiB; on
    CPU the process's RSS high-water mark, and None."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None


def saved_activation_bytes(module: torch.nn.Module, fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while fn() runs, the module's own
    parameters left out: the activation memory of a step, on any device."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out  # the graph and what it saved go with it
    return sum(storages.values())
