"""The BEiT-style encoder of the CLIP recipe (recipe ⌘; the authors' `beit` branch).

No absolute position embedding: one relative position bias shared by every block, layer scale
on both residual branches, q/v biases (no k bias), BEiT's initialisation. Built from timm's Beit
blocks, so its state dict loads strictly into `timm.models.beit.Beit(use_abs_pos_emb=False,
use_shared_rel_pos_bias=True, init_values=..., global_pool="", num_classes=0)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from timm.layers import PatchEmbed
from timm.models.beit import Block as TimmBeitBlock
from timm.models.beit import RelativePositionBias

from dbot_ds.models.sizes import ViTArch
from dbot_ds.models.vit import drop_path_rates, layer_norm, run_blocks

INIT_STD = 0.02


class Block(TimmBeitBlock):
    """timm's Beit block with its layer scales applied in the activations' dtype: under autocast
    the fp32 gammas would otherwise promote the residual stream to fp32."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        g1, g2 = self.gamma_1.to(x.dtype), self.gamma_2.to(x.dtype)
        x = x + self.drop_path1(g1 * self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        return x + self.drop_path2(g2 * self.mlp(self.norm2(x)))


def trunc_normal_beit_(tensor: torch.Tensor) -> torch.Tensor:
    """BEiT's init: normal(0, 0.02) truncated at +-1 std (not timm's default of +-2 absolute)."""
    return nn.init.trunc_normal_(tensor, std=INIT_STD, a=-INIT_STD, b=INIT_STD)


def init_beit_style(module: nn.Module) -> None:
    """Truncated-normal linear and patch-embedding weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_beit_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BeitViT(nn.Module):
    """Patch embedding + cls token + blocks sharing one relative position bias + final norm.

    The same interface as models.vit.ViT. It sees every position (no subset: relative biases are
    defined on the full grid), so it is used without the asymmetric decoder.
    """

    def __init__(self, arch: ViTArch, drop_path: float = 0.0):
        super().__init__()
        self.arch = arch
        grid = (arch.grid, arch.grid)
        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, arch.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.width))
        self.rel_pos_bias = RelativePositionBias(window_size=grid, num_heads=arch.heads)
        self.blocks = nn.ModuleList([
            Block(arch.width, arch.heads, qkv_bias=True, mlp_ratio=arch.mlp_ratio, drop_path=rate,
                  norm_layer=layer_norm, init_values=arch.layer_scale)
            for rate in drop_path_rates(drop_path, arch.depth)])
        self.norm = layer_norm(arch.width)
        self.grad_checkpointing = False
        self.reset_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reset_parameters(self) -> None:
        init_beit_style(self)
        trunc_normal_beit_(self.cls_token)
        for block in self.blocks:  # timm's own resets: zero q/v biases, layer scale
            block.reset_parameters()
            block.attn.reset_parameters()
        self.rel_pos_bias.reset_parameters()
        with torch.no_grad():  # depth rescale of each block's output projections (BEiT)
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def fixed_buffers(self) -> dict[str, torch.Tensor]:
        return {}  # the bias index is a non-persistent buffer, rebuilt by the module

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}  # the authors' BEiT pre-training skip list (no pos_embed here)

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, 3, H, W] -> patch tokens [B, N, D]."""
        return self.patch_embed(imgs)

    def block_input(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """patch tokens [B, N, D] -> [B, 1+N, D] with cls prepended (positions live in the bias)."""
        if ids_keep is not None:
            raise ValueError("the BEiT-style encoder sees every position: use it without the "
                             "asymmetric decoder (model.decoder=false)")
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor | None = None,
               final_norm: bool = True) -> torch.Tensor:
        """tokens [B, N, D] -> [B, 1+N, D]."""
        x = self.block_input(tokens, ids_keep)
        bias = self.rel_pos_bias()  # [heads, 1+N, 1+N]
        x = run_blocks(self.blocks, x, self.grad_checkpointing, shared_rel_pos_bias=bias)
        return self.norm(x) if final_norm else x

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None,
                final_norm: bool = True, project: bool = False) -> torch.Tensor:
        if project:
            raise ValueError("a BEiT-style encoder has no output projection")
        return self.encode(self.embed_patches(imgs), ids_keep, final_norm)
