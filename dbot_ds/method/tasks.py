"""What a micro-step computes, for each kind of training; the loop (runtime/trainer.py) is shared.

A task gives the loss of one micro-batch of device-ready data through the engine (the model
DeepSpeed wraps), says what happens after an optimizer step, what a checkpoint keeps of it
(state: JSON; tensors: kept beside the checkpoint), and how to evaluate. `phases(name)` brackets the parts of the step (the benchmark times them).

- DistillTask: masked knowledge distillation. Teacher targets of the whole image, masks, the
  student's predictions, the loss over masked tokens; its teacher policy after each step.
- ClassifyTask: supervised fine-tuning. Mixup / CutMix with label smoothing (timm's), the
  classifier's logits, the soft-target loss; top-1 / top-5 on the validation set.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterable

import torch

from dbot_ds.config import FinetuneConfig, RunConfig
from dbot_ds.method.losses import masked_distill_loss
from dbot_ds.method.masking import Masks, block_masking, random_masking
from dbot_ds.method.teacher import Teacher


def no_phases(name: str):
    return contextlib.nullcontext()


def draw_masks(cfg: RunConfig, batch: int, device: torch.device) -> Masks:
    """This micro-step's masks, from the generators seeded for it: random masking on the device,
    or BEiT block masking from a python RNG seeded by the (CPU) torch generator."""
    arch = cfg.model.encoder_arch()
    if cfg.mask.kind == "block":
        rng = random.Random(int(torch.randint(2**62, ())))
        return block_masking(batch, arch.grid, cfg.mask.num_masked(arch.num_patches), rng, device=device,
                             min_block=cfg.mask.block_min, min_aspect=cfg.mask.block_aspect)
    return random_masking(batch, arch.num_patches, cfg.mask.ratio, device=device)


def distill_loss(student, teacher: Teacher, imgs: torch.Tensor, cfg: RunConfig, masks: Masks | None = None,
                 phases=no_phases) -> torch.Tensor:
    """The masked distillation loss of one micro-batch of normalised images [B, 3, H, W]; masks
    are drawn here unless given."""
    with phases("teacher_forward"):
        target = teacher.targets(imgs)                                # [B, 1+N, Dt]
    if cfg.mask.per_image > 1:  # one teacher forward, K masked views of each image
        imgs = imgs.repeat_interleave(cfg.mask.per_image, dim=0)     # [B*K, 3, H, W]
        target = target.repeat_interleave(cfg.mask.per_image, dim=0)
    if masks is None:
        masks = draw_masks(cfg, imgs.shape[0], imgs.device)
    with phases("student_forward"):
        pred = student(imgs, masks)                                   # [B, 1+N, Dt]
    return masked_distill_loss(pred, target, masks.mask, kind=cfg.loss.kind, beta=cfg.loss.beta,
                               tokens=cfg.loss.tokens)


class DistillTask:
    name = "distill"

    def __init__(self, cfg: RunConfig, teacher: Teacher, policy):
        self.cfg, self.teacher, self.policy = cfg, teacher, policy

    def loss(self, engine, imgs: torch.Tensor, phases=no_phases) -> torch.Tensor:
        return distill_loss(engine, self.teacher, imgs, self.cfg, phases=phases)

    def examples(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
        """(the teacher's input, the student's inputs) at the training shapes: what compiling
        warms up with."""
        cfg, n = self.cfg, self.cfg.batch.micro_batch
        size, views = self.teacher.arch.img_size, n * cfg.mask.per_image
        student = torch.zeros(views, 3, cfg.model.img_size, cfg.model.img_size, device=device, dtype=dtype)
        return (torch.zeros(n, 3, size, size, device=device, dtype=self.teacher.dtype),
                (student, draw_masks(cfg, views, device)))

    def after_step(self, engine, step: int, total: int, gather) -> None:
        self.policy.after_step(self.teacher, engine.module, step, total, gather)

    def evaluate(self, engine) -> dict | None:
        return None  # students are evaluated afterwards (probe, finetune)

    def state(self) -> dict:
        return self.policy.state(self.teacher)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.policy.tensors(self.teacher)

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.policy.restore(self.teacher, state, tensors)


class ClassifyTask:
    name = "classify"

    def __init__(self, cfg: FinetuneConfig, num_classes: int, val_batches: Callable[[], Iterable],
                 reduce: Callable[[torch.Tensor], None], dtype: torch.dtype = torch.float32):
        """val_batches() -> this rank's (normalised images, labels) of the validation set, on the
        device; reduce(t) sums t over the ranks in place; dtype: what the model computes in (the
        training images come in fp32, are mixed in fp32, then cast)."""
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        a = cfg.augment
        mixing = a.mixup > 0 or a.cutmix > 0  # timm's Mixup refuses both at 0: that is mixing off
        self.mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.smoothing,
                           num_classes=num_classes) if mixing else None
        self.loss_fn = SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(a.smoothing)
        self.val_batches, self.reduce, self.dtype = val_batches, reduce, dtype

    def loss(self, engine, batch, phases=no_phases) -> torch.Tensor:
        imgs, labels = batch                   # [B, 3, H, W] fp32, [B]
        if self.mixup is not None:
            imgs, labels = self.mixup(imgs, labels)  # soft targets [B, classes]
        with phases("student_forward"):
            logits = engine(imgs.to(self.dtype))
        return self.loss_fn(logits.float(), labels)

    def after_step(self, engine, step: int, total: int, gather) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Top-1 / top-5 over the whole validation set (every rank's share, summed)."""
        model.eval()
        counts = torch.zeros(3, device=next(model.parameters()).device)  # top-1 hits, top-5 hits, images
        for imgs, labels in self.val_batches():
            logits = model(imgs).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices         # [B, 5]
            hits = torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                                torch.full((), len(labels), device=labels.device)]).float()
            counts += hits
        model.train()
        self.reduce(counts)
        return {"top1": (counts[0] / counts[2]).item(), "top5": (counts[1] / counts[2]).item()}

    def state(self) -> dict:
        return {}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        pass
