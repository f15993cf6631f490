"""The frozen teacher: outside DeepSpeed, no gradients, inference_mode, bf16 when bf16 is on."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.accel import CudaGraphed, cuda_graphs_available
from dbot_ds.config import ConfigError
from dbot_ds.export import ExportError, read_export
from dbot_ds.losses import normalize_tokens
from dbot_ds.models import ViT, ViTArch


class Teacher(nn.Module):
    """Wraps a ViT encoder; `targets` gives the last block's tokens (cls + patches)."""

    def __init__(self, encoder: ViT, identity: str, *, final_norm: bool = False,
                 normalize: bool = True, dtype: torch.dtype = torch.float32,
                 autocast: torch.dtype | None = None):
        """dtype: the weights' dtype (bf16 for a frozen teacher under bf16); autocast: compute
        dtype for fp32 weights that keep changing (the EMA teacher)."""
        super().__init__()
        self.encoder = encoder.to(dtype).eval().requires_grad_(False)
        self.identity = identity  # sha256 of its weights, or "ema"
        self.final_norm, self.normalize, self.dtype, self.autocast = final_norm, normalize, dtype, autocast
        self.graphed: CudaGraphed | None = None

    @property
    def arch(self) -> ViTArch:
        return self.encoder.arch

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: no drop path in the teacher

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] -> float32 targets [B, 1+N, Dt], a normal (non-inference) tensor."""
        amp = (torch.autocast(imgs.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            size = self.encoder.arch.img_size
            if imgs.shape[-1] != size:  # a teacher of another patch size sees the same image
                imgs = F.interpolate(imgs, size=(size, size), mode="bicubic", antialias=True)
            encode = self.graphed or functools.partial(self.encoder, final_norm=self.final_norm)
            feats = encode(imgs.to(self.dtype))
        # Outside inference_mode a functional op makes a normal tensor, and a copy: a graph's
        # static output is overwritten by the next replay.
        return normalize_tokens(feats.float()) if self.normalize else feats.to(torch.float32, copy=True)

    def use_cuda_graphs(self) -> bool:
        """Replay the encoder forward from CUDA graphs (one per input shape) from now on; on a
        device without CUDA graphs, warn and stay eager. Returns whether graphs are used."""
        if not cuda_graphs_available(next(self.encoder.parameters()).device):
            return False
        # the encoder, not self: no reference cycle keeps a replaced teacher's graph pool alive
        self.graphed = CudaGraphed(functools.partial(self.encoder, final_norm=self.final_norm))
        return True


def random_encoder(arch: ViTArch, seed: int) -> ViT:
    """A random ViT built from `seed` alone: identical on every rank, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViT(arch)


def encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_from_export(path: str | Path) -> tuple[ViT, dict]:
    state, meta = read_export(path)
    arch = ViTArch(**meta["encoder"])
    encoder = ViT(arch)
    missing, unexpected = encoder.load_state_dict(encoder_state(state), strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not fit the architecture in meta.json "
                          f"(missing {missing}, unexpected {unexpected})")
    return encoder, meta


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
