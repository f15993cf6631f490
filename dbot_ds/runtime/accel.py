"""Optional accelerators: apex's fused kernels when importable, torch.compile and CUDA-graph
replay behind switches.

NVIDIA apex is not on PyPI (the `apex` there is an unrelated web toolkit): it is used when a
cluster image provides it, and torch's own fused paths are used otherwise.
"""

from __future__ import annotations

import logging
import warnings

import torch
from timm.models.beit import Block as BeitBlock
from timm.models.vision_transformer import Block
from torch import nn

log = logging.getLogger("dbot_ds")


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
          device: torch.device):
    """apex FusedAdam (AdamW mode) on GPUs when importable, else torch AdamW (fused on GPUs)."""
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
        except ImportError:
            pass
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


def fuse_layernorms(module: nn.Module) -> int:
    """Swap nn.LayerNorm for apex FusedLayerNorm in place (same parameters); 0 without apex/GPU."""
    try:
        from apex.normalization import FusedLayerNorm
    except ImportError:
        return 0
    swapped = 0
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.LayerNorm and child.weight is not None and child.weight.is_cuda:
                fused = FusedLayerNorm(child.normalized_shape, eps=child.eps).to(child.weight.device)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
                swapped += 1
    return swapped


def try_compile(module: nn.Module, backend: str, *example_inputs, grad: bool = False) -> bool:
    """Compile `module`'s transformer blocks in place (the whole module if it has none; state_dict
    names unchanged); if the backend is unavailable or fails on a first call with example inputs
    (with autograd recording when `grad`, as in training), warn and stay eager. Returns whether
    it compiled.

    Per block, as torchtitan: blocks that are alike share one compiled graph (the teacher's, the
    decoder's), so their compile time does not grow with depth; the student's encoder blocks
    differ in drop-path rate and compile one each. All blocks run one code object (timm's ViT or
    Beit Block.forward), whose variants dynamo caps (recompile_limit, 8 by default) before running
    the rest eagerly without a warning: the cap is raised to cover every block twice.
    dynamic=False: training shapes are fixed."""
    if not backend:
        return False
    parts = [m for m in module.modules() if isinstance(m, (Block, BeitBlock))] or [module]
    import torch._dynamo  # loaded on demand: a second of import time

    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo, limit, max(getattr(dynamo, limit), 2 * len(parts) + 8))
    try:
        for part in parts:
            part.compile(backend=backend, dynamic=False)
        with torch.set_grad_enabled(grad):
            module(*example_inputs)
        return True
    except Exception as e:  # no compiler, unknown backend, unsupported op...
        for part in parts:
            part._compiled_call_impl = None  # back to eager
        warnings.warn(f"torch.compile(backend={backend!r}) unavailable here, running eagerly: "
                      f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return False


class CudaGraphed:
    """`fn(x)` replayed from a CUDA graph captured on its first call with each input shape.

    For a forward with no randomness and fixed-shape inputs (the frozen teacher): one replay
    replaces hundreds of kernel launches. The returned tensor is the graph's static output,
    overwritten by the next call: copy it before calling again. Parameters may change in place
    between calls (an EMA teacher); they must not be replaced by new tensors.
    Costs the graph's private memory pool (about one forward's peak activations) per shape.
    """

    def __init__(self, fn, max_shapes: int = 4):
        self.fn, self.max_shapes = fn, max_shapes
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_shapes:  # shapes keep changing: graphs would not pay
                return self.fn(x)
            self.graphs[key] = self._capture(x)
        static_in, static_out, graph = self.graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS handles, compiled kernels
            for _ in range(3):
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread may call CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        return static_in, static_out, graph


def cuda_graphs_available(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device; elsewhere the switch warns and the call stays eager."""
    if device.type == "cuda":
        return True
    warnings.warn(f"CUDA-graph capture needs a CUDA device, running eagerly on {device.type}")
    return False


def graph_teacher(teacher) -> bool:
    """Replay the teacher's forward from CUDA graphs (one per input shape) from now on; on a
    device without CUDA graphs, warn and stay eager. Returns whether graphs are used."""
    if not cuda_graphs_available(next(teacher.encoder.parameters()).device):
        return False
    teacher.graphed = CudaGraphed(teacher.forward_fn())
    return True


def apply_fast_paths(backend: str, cuda_graph_teacher: bool, teacher, student: nn.Module,
                     teacher_input: torch.Tensor, student_inputs: tuple) -> None:
    """torch.compile teacher and student in place when `backend` names one (warmed up at the
    training shapes: the example inputs); then the teacher's CUDA graphs when asked (captured at
    its first call)."""
    if backend:
        with torch.inference_mode():
            try_compile(teacher.encoder, backend, teacher_input)
        try_compile(student, backend, *student_inputs, grad=True)
    if cuda_graph_teacher:
        graph_teacher(teacher)
