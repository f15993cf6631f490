"""The benchmark's baseline: the DeepSpeed engine's calls (forward, backward, step) in plain PyTorch."""

from __future__ import annotations

import torch

from dbot_ds.config import TrainingConfig
from dbot_ds.runtime.accel import adamw
from dbot_ds.runtime.engine import param_groups


class PlainEngine:
    """The plain PyTorch counterpart of the DeepSpeed engine, for the same micro_step and
    with the same kernels: under bf16 the module holds bf16 weights and the optimizer updates an
    fp32 master copy, gradients accumulate in fp32 across micro-batches (as DeepSpeed's bf16
    optimizers with grad_accum_dtype fp32), the same param groups and AdamW (fused on GPUs); fp32
    runs keep fp32 weights. What it leaves out: ZeRO partitioning and communication (one
    process), gradient clipping and the non-finite-gradient check."""

    def __init__(self, student, cfg: TrainingConfig, device, dtype, accum: int = 1):
        self.module, self.accum, self.micro = student.to(device), accum, 0
        self.params = [p for p in student.parameters() if p.requires_grad]
        for p in self.params:  # parameters in the compute dtype, buffers fp32: as DeepSpeed's engine
            p.data = p.data.to(dtype)
        self.mixed = dtype != torch.float32
        groups = param_groups(student, cfg.optim.weight_decay)
        if self.mixed:  # fp32 masters standing in for the bf16 weights in the optimizer's groups
            master = {id(p): p.detach().float().clone() for p in self.params}
            groups = [{**g, "params": [master[id(p)] for p in g["params"]]} for g in groups]
            self.master = [master[id(p)] for p in self.params]
            self.grads = [torch.zeros_like(m) for m in self.master]  # fp32 accumulation buffers
            for m, g in zip(self.master, self.grads):
                m.grad = g
        self.opt = adamw(groups, cfg.peak_lr(), cfg.optim.betas, cfg.optim.eps, device)

    def __call__(self, imgs, masks):
        return self.module(imgs, masks)

    def backward(self, loss):
        (loss / self.accum).backward()  # DeepSpeed scales by the accumulation steps too

    @torch.no_grad()
    def step(self):
        """Like DeepSpeed's engine.step: every call ends a micro-batch, every accum-th updates."""
        self.micro += 1
        if self.mixed:
            torch._foreach_add_(self.grads, [p.grad for p in self.params])
            for p in self.params:
                p.grad = None
        if self.micro % self.accum:
            return
        self.opt.step()
        if self.mixed:
            torch._foreach_copy_(self.params, self.master)  # rounded to bf16
            torch._foreach_zero_(self.grads)
        else:
            self.opt.zero_grad(set_to_none=True)
