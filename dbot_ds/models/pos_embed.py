"""Fixed 2-D sin-cos position embeddings (as MAE), and resampling a table to another grid."""

import math

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: [M] -> [M, dim]: half sin, half cos."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double()[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """[1, (cls) + grid*grid, dim] float32; the cls position is zero."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")  # MAE: w goes first
    emb = torch.cat([sincos_1d(dim // 2, gx.flatten()), sincos_1d(dim // 2, gy.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def resample_pos_table(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1+G*G, D] position table -> [1, 1+grid*grid, D]: the patch part resampled bicubically
    the way the authors' interpolate_pos_encoding (DINO's) does it, with the scale factor
    (grid + 0.1) / G rather than a target size; the cls entry unchanged. Used for learned and
    sin-cos tables alike (e.g. a ViT-H/14 teacher's 16x16 table at 196 px: 14x14)."""
    cls, table = pos[:, :1], pos[:, 1:]
    old = math.isqrt(table.shape[1])
    if old * old != table.shape[1]:
        raise ValueError(f"position table of {table.shape[1]} patches is not a square grid")
    dim = table.shape[-1]
    scale = (grid + 0.1) / old  # the +0.1 makes floor(old * scale) land on `grid`
    table = F.interpolate(table.reshape(1, old, old, dim).permute(0, 3, 1, 2).float(),
                          scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)
    return torch.cat([cls, table], dim=1)
