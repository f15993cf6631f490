"""The frozen teacher: outside DeepSpeed, no gradients, inference_mode, bf16 when bf16 is on."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.config import ConfigError, RunConfig
from dbot_ds.input_norms import INPUT_NORMS, STUDENT_NORM
from dbot_ds.method.losses import normalize_tokens
from dbot_ds.models import ViTArch, build_encoder


class TeacherWeights(NamedTuple):
    """A teacher encoder as read and checked, before it becomes a Teacher."""
    encoder: nn.Module
    identity: str     # sha256 of its weights (an export's, or the weights file's)
    input_norm: str   # the normalisation its training images had: a key of INPUT_NORMS


class Teacher(nn.Module):
    """Wraps a ViT encoder; `targets` gives its last block's tokens (cls + patches), optionally
    through its final norm and CLIP's projection, optionally normalised per token.

    It receives the student's images (normalised with STUDENT_NORM) and sees them as it was
    trained to: a CLIP teacher renormalises them to CLIP's mean/std."""

    def __init__(self, encoder: nn.Module, identity: str, *, final_norm: bool = False,
                 project: bool = False, normalize: bool = True, input_norm: str = STUDENT_NORM,
                 dtype: torch.dtype = torch.float32, autocast: torch.dtype | None = None):
        """dtype: the weights' dtype (bf16 for a frozen teacher under bf16); autocast: compute
        dtype for fp32 weights that keep changing (the EMA teacher)."""
        super().__init__()
        if project and getattr(encoder, "proj", None) is None:
            raise ConfigError("teacher.project=true needs a teacher with an output projection (CLIP's "
                              "visual `proj`); this teacher has none: set teacher.project=false")
        self.encoder = encoder.to(dtype).eval().requires_grad_(False)
        self.identity = identity  # sha256 of its weights, or "ema"
        self.final_norm, self.project, self.normalize = final_norm, project, normalize
        self.input_norm, self.dtype, self.autocast = input_norm, dtype, autocast
        scale, shift = renormalization(STUDENT_NORM, input_norm)
        self.register_buffer("in_scale", scale, persistent=False)  # [1, 3, 1, 1]
        self.register_buffer("in_shift", shift, persistent=False)
        self.graphed = None  # a replay of forward_fn (runtime.accel.graph_teacher), else eager

    @property
    def arch(self) -> ViTArch:
        return self.encoder.arch

    @property
    def target_width(self) -> int:
        return self.arch.proj_dim if self.project else self.arch.width

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no drop path in the teacher

    def forward_fn(self):
        # the encoder, not self: no reference cycle keeps a replaced teacher's graph pool alive
        return functools.partial(self.encoder, final_norm=self.final_norm, project=self.project)

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] (student-normalised) -> float32 targets [B, 1+N, Dt], a normal
        (non-inference) tensor."""
        amp = (torch.autocast(imgs.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            if self.input_norm != STUDENT_NORM:
                imgs = imgs.float() * self.in_scale + self.in_shift
            size = self.encoder.arch.img_size
            if imgs.shape[-1] != size:  # a teacher of another patch size sees the same image
                imgs = F.interpolate(imgs.float(), size=(size, size), mode="bicubic", antialias=True)
            feats = (self.graphed or self.forward_fn())(imgs.to(self.dtype))
        # Outside inference_mode a functional op makes a normal tensor, and a copy: a graph's
        # static output is overwritten by the next replay.
        return normalize_tokens(feats.float()) if self.normalize else feats.to(torch.float32, copy=True)


def build_teacher(cfg: RunConfig, weights: TeacherWeights, dtype: torch.dtype, **kw) -> Teacher:
    """The Teacher the run config asks for around checked weights: target layer, projection,
    per-token normalisation, and the input normalisation of the weights (or the config's)."""
    norm = weights.input_norm if cfg.teacher.input_norm == "auto" else cfg.teacher.input_norm
    return Teacher(weights.encoder, weights.identity, final_norm=cfg.teacher.final_norm,
                   project=cfg.teacher.project, normalize=cfg.teacher.normalize_target,
                   input_norm=norm, dtype=dtype, **kw)


def renormalization(source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [1, 3, 1, 1] taking images normalised with `source`'s mean/std to `target`'s:
    (x * std_s + mean_s - mean_t) / std_t."""
    (mean_s, std_s), (mean_t, std_t) = (torch.tensor(INPUT_NORMS[n], dtype=torch.float64) for n in (source, target))
    scale, shift = std_s / std_t, (mean_s - mean_t) / std_t
    return scale.float().view(1, 3, 1, 1), shift.float().view(1, 3, 1, 1)


def random_encoder(arch: ViTArch, seed: int) -> nn.Module:
    """A random ViT built from `seed` alone: identical on every rank, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(arch)


def check_fits(teacher_arch: ViTArch, student_arch: ViTArch, source: str) -> None:
    """One target per student token: the teacher's input is resized to student grid x teacher
    patch pixels (196 px for a /14 teacher of a 224 px /16 student). Beyond 2x either way the
    teacher would see a different image scale than it was trained for: an error."""
    needed = student_arch.grid * teacher_arch.patch_size
    if not 0.5 <= needed / teacher_arch.img_size <= 2.0:
        raise ConfigError(
            f"teacher {source} has a {teacher_arch.grid}x{teacher_arch.grid} token grid "
            f"(img {teacher_arch.img_size}, patch {teacher_arch.patch_size}); matching the student's "
            f"{student_arch.grid}x{student_arch.grid} grid (img {student_arch.img_size}, patch "
            f"{student_arch.patch_size}) would need {needed} px teacher inputs, more than 2x off its "
            f"{teacher_arch.img_size} px: use a teacher with a closer grid")


def random_teacher_arch(student: ViTArch, depth: int | None) -> ViTArch:
    return student if depth is None else dataclasses.replace(student, depth=depth)
