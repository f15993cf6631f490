"""Analytic FLOPs of one dBOT training image (multiply-add = 2 FLOPs), and a measured count.

Matmul work only (what torch.utils.flop_counter counts): patch embedding, qkv/proj/MLP linears,
attention's two batched matmuls. Backward is 2x forward, except the student's patch embedding,
whose input needs no gradient (weight gradient only).
"""

from __future__ import annotations

import dataclasses

from torch.utils.flop_counter import FlopCounterMode

from dbot_ds.models.sizes import num_visible
from dbot_ds.models import DecoderArch, ViTArch


def block_forward(width: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    linear = 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * tokens * tokens * width                     # q @ k^T, attn @ v
    return linear + attention


def patch_embed_forward(arch: ViTArch) -> float:
    return 2 * arch.num_patches * arch.width * 3 * arch.patch_size**2


def encoder_forward(arch: ViTArch, tokens: int) -> float:
    return patch_embed_forward(arch) + arch.depth * block_forward(arch.width, tokens, arch.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    teacher_forward: float
    student_encoder: float  # forward + backward
    decoder: float          # forward + backward, including the head

    @property
    def total(self) -> float:
        return self.teacher_forward + self.student_encoder + self.decoder


def dbot_flops_per_image(student: ViTArch, decoder: DecoderArch | None, teacher: ViTArch,
                         mask_ratio: float, masks_per_image: int = 1) -> StepFlops:
    """Per source image; with K masks per image the student's share is counted K times."""
    if masks_per_image > 1:
        one = dbot_flops_per_image(student, decoder, teacher, mask_ratio)
        return StepFlops(one.teacher_forward, masks_per_image * one.student_encoder, masks_per_image * one.decoder)
    full = student.num_patches + 1
    teacher_fwd = encoder_forward(teacher, teacher.num_patches + 1)
    if decoder is None:  # the encoder sees every position, the head reads all of them
        blocks = student.depth * block_forward(student.width, full, student.mlp_ratio)
        head = 2 * full * student.width * teacher.width
        return StepFlops(teacher_fwd, 2 * patch_embed_forward(student) + 3 * blocks, 3 * head)
    visible = num_visible(student.num_patches, mask_ratio) + 1
    blocks = student.depth * block_forward(student.width, visible, student.mlp_ratio)
    dec = (2 * visible * student.width * decoder.width
           + decoder.depth * block_forward(decoder.width, full, decoder.mlp_ratio)
           + 2 * full * decoder.width * teacher.width)
    return StepFlops(teacher_fwd, 2 * patch_embed_forward(student) + 3 * blocks, 3 * dec)


def measured_step_flops(step_fn, *args) -> int:
    """FLOPs that torch.utils.flop_counter sees while step_fn(*args) runs (meta tensors work)."""
    with FlopCounterMode(display=False) as counter:
        step_fn(*args)
    return counter.get_total_flops()
