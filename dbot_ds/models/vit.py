"""One ViT encoder for every size, key-compatible with timm's VisionTransformer (num_classes=0)."""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint
from torch import nn
from timm.layers import PatchEmbed, QuickGELU
from timm.models.vision_transformer import Block

from dbot_ds.models.pos_embed import sincos_2d
from dbot_ds.models.sizes import ViTArch


layer_norm = functools.partial(nn.LayerNorm, eps=1e-6)  # timm's ViT default


def init_mae_style(module: nn.Module) -> None:
    """Xavier-uniform linear layers, zero biases, unit LayerNorms (as MAE)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 to `rate` over `depth` blocks: torch.linspace, as
    timm, MAE and the authors compute it (the same floats)."""
    return torch.linspace(0, rate, depth, device="cpu").tolist()  # cpu: also under a meta-device context


def run_blocks(blocks, x: torch.Tensor, checkpointed: bool = False, **kw) -> torch.Tensor:
    """x through each block; with `checkpointed` (and autograd recording) each block's
    activations are recomputed in the backward instead of kept (the same numbers: the RNG
    state of drop path is replayed)."""
    for block in blocks:
        if checkpointed and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kw)
        else:
            x = block(x, **kw)
    return x


def transformer_blocks(width: int, depth: int, heads: int, mlp_ratio: float,
                       drop_path: float = 0.0, act: str = "gelu", norm_eps: float = 1e-6) -> nn.Sequential:
    act_layer = QuickGELU if act == "quick_gelu" else nn.GELU
    norm = functools.partial(nn.LayerNorm, eps=norm_eps)
    return nn.Sequential(*[
        Block(width, heads, mlp_ratio, qkv_bias=True, drop_path=rate, norm_layer=norm, act_layer=act_layer)
        for rate in drop_path_rates(drop_path, depth)])


class ViT(nn.Module):
    """Patch embedding + cls token + fixed sin-cos positions + blocks + final norm.

    depth 0 is allowed: the random "patch embedding + position" teacher of ViT-L/H stage 1.
    """

    def __init__(self, arch: ViTArch, drop_path: float = 0.0):
        super().__init__()
        if arch.family != "vit":
            raise ValueError(f"ViT builds the vit family, not {arch.family!r}: use models.build_encoder")
        self.arch = arch
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, arch.width, bias=arch.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.width))
        self.register_buffer("pos_embed", sincos_2d(arch.width, arch.grid))  # [1, 1+N, D], fixed
        norm = functools.partial(nn.LayerNorm, eps=arch.norm_eps)
        self.norm_pre = norm(arch.width) if arch.pre_norm else nn.Identity()
        self.blocks = transformer_blocks(arch.width, arch.depth, arch.heads, arch.mlp_ratio, drop_path,
                                         arch.act, arch.norm_eps)
        self.norm = norm(arch.width)
        # CLIP's visual projection (imported CLIP teachers only): the CLIP recipe's target width
        self.proj = nn.Linear(arch.width, arch.proj_dim, bias=False) if arch.proj_dim else None
        self.grad_checkpointing = False
        self.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward (timm's switch of the same name)."""
        self.grad_checkpointing = enable

    def reset_parameters(self) -> None:
        init_mae_style(self)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear layer (MAE)
        if self.patch_embed.proj.bias is not None:
            nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def fixed_buffers(self) -> dict[str, torch.Tensor]:
        """Exact fp32 values of the non-learned state (bf16 engines round the live buffers)."""
        return {"pos_embed": sincos_2d(self.arch.width, self.arch.grid)}

    def no_weight_decay(self) -> set[str]:
        return set()  # the authors' add_weight_decay: every >1-D parameter decays, cls token too

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] -> patch tokens [B, N, D], positions not yet added."""
        return self.patch_embed(imgs)

    def block_input(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """patch tokens [B, N, D] (+ ids_keep [B, K]) -> the first block's input [B, 1+K, D]:
        positions added, the visible subset kept, cls prepended (K = N without ids_keep)."""
        # in the activations' dtype: fp32 positions or cls token (engines keep buffers fp32 under
        # bf16; autocast keeps fp32 weights) would promote the whole residual stream to fp32
        pos = self.pos_embed.to(tokens.dtype)
        x = tokens + pos[:, 1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token.to(tokens.dtype) + pos[:, :1]).expand(x.shape[0], -1, -1)
        return self.norm_pre(torch.cat([cls, x], dim=1))

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None,
               final_norm: bool = True) -> torch.Tensor:
        """tokens [B, N, D] (+ ids_keep [B, K]) -> [B, 1+K, D] (K = N without ids_keep)."""
        x = run_blocks(self.blocks, self.block_input(tokens, ids_keep), self.grad_checkpointing)
        return self.norm(x) if final_norm else x

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                final_norm: bool = True, project: bool = False) -> torch.Tensor:
        """imgs [B, 3, H, W] -> [B, 1+K, D], or [B, 1+K, proj_dim] through CLIP's projection."""
        x = self.encode(self.embed_patches(imgs), ids_keep, final_norm)
        if project:
            if self.proj is None:
                raise ValueError("this encoder has no output projection (CLIP's `proj`)")
            x = self.proj(x)
        return x
