"""MAE's light decoder: visible tokens + mask tokens back in place, a few narrow blocks."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dbot_ds.models.pos_embed import sincos_2d
from dbot_ds.models.vit import init_mae_style, layer_norm, run_blocks, transformer_blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderArch:
    width: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"decoder width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Decoder(nn.Module):
    """drop_path: the student's rate, on a linear ramp of its own over the decoder blocks
    (authors' models_mae.py: linspace(0, rate, decoder_depth))."""

    def __init__(self, in_width: int, arch: DecoderArch, grid: int, drop_path: float = 0.0):
        super().__init__()
        self.arch, self.grid = arch, grid
        self.embed = nn.Linear(in_width, arch.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, arch.width))
        self.register_buffer("pos_embed", sincos_2d(arch.width, grid))  # [1, 1+N, Dd]
        self.blocks = transformer_blocks(arch.width, arch.depth, arch.heads, arch.mlp_ratio, drop_path)
        self.norm = layer_norm(arch.width)
        self.grad_checkpointing = False
        init_mae_style(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def fixed_buffers(self) -> dict[str, torch.Tensor]:
        return {"pos_embed": sincos_2d(self.arch.width, self.grid)}

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """x [B, 1+K, D] (cls + visible), ids_restore [B, N] -> [B, 1+N, Dd]."""
        x = self.embed(x)
        b, n, d = x.shape[0], ids_restore.shape[1], x.shape[2]
        mask_tokens = self.mask_token.to(x.dtype).expand(b, n + 1 - x.shape[1], -1)  # not promoting x to fp32
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        return self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
