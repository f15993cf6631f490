"""The student: encoder on visible tokens, decoder, linear head to the teacher's width.

This is the only module DeepSpeed wraps. Masks and loss come from outside (masking.py, losses.py).
"""

from __future__ import annotations

import torch
from torch import nn

from dbot_ds.method.masking import Masks
from dbot_ds.models import Decoder, DecoderArch, ViTArch, build_encoder
from dbot_ds.models.beit import init_beit_style, trunc_normal_beit_


class Student(nn.Module):
    """decoder=None gives the variant without the asymmetric decoder: the encoder sees
    every position, masked patches replaced by a learned mask token (BEiT-style). The decoder
    blocks get the student's drop-path rate on a ramp of their own."""

    def __init__(self, encoder: ViTArch, decoder: DecoderArch | None, target_width: int,
                 drop_path: float = 0.0):
        super().__init__()
        self.encoder = build_encoder(encoder, drop_path)
        if decoder is not None:
            self.decoder = Decoder(encoder.width, decoder, encoder.grid, drop_path)
            head_in = decoder.width
        else:
            self.decoder = None
            self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.width))
            head_in = encoder.width
        self.head = nn.Linear(head_in, target_width)
        if encoder.family == "beit":  # the authors' BEiT init: truncated normal
            init_beit_style(self.head)
            trunc_normal_beit_(self.mask_token)
        else:  # MAE's: Xavier-uniform, mask token normal(0.02)
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)
            if self.decoder is None:
                nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per transformer block of the encoder and the decoder."""
        self.encoder.set_grad_checkpointing(enable)
        if self.decoder is not None:
            self.decoder.grad_checkpointing = enable

    def fixed_buffers(self) -> dict[str, torch.Tensor]:
        out = {f"encoder.{k}": v for k, v in self.encoder.fixed_buffers().items()}
        if self.decoder is not None:
            out.update({f"decoder.{k}": v for k, v in self.decoder.fixed_buffers().items()})
        return out

    def no_weight_decay(self) -> set[str]:
        """Parameters (beyond biases and other 1-D tensors) that take no weight decay."""
        return {f"encoder.{k}" for k in self.encoder.no_weight_decay()}

    def forward(self, imgs: torch.Tensor, masks: Masks) -> torch.Tensor:
        """imgs [B, 3, H, W] -> predictions [B, 1+N, target_width] for cls + every patch."""
        tokens = self.encoder.embed_patches(imgs)  # [B, N, D]
        if self.decoder is not None:
            x = self.encoder.encode(tokens, masks.ids_keep)  # [B, 1+K, D]
            x = self.decoder(x, masks.ids_restore)           # [B, 1+N, Dd]
        else:
            m = masks.mask.unsqueeze(-1).to(tokens.dtype)
            x = self.encoder.encode(tokens * (1 - m) + self.mask_token.to(tokens.dtype) * m)  # [B, 1+N, D]
        return self.head(x)
