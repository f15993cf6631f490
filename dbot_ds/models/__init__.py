"""Architectures only: no DeepSpeed, no torch.distributed, no training state."""

from torch import nn

from dbot_ds.models.sizes import FAMILIES, SIZES, ViTArch, vit_arch
from dbot_ds.models.vit import ViT
from dbot_ds.models.beit import BeitViT
from dbot_ds.models.decoder import Decoder, DecoderArch


def build_encoder(arch: ViTArch, drop_path: float = 0.0) -> nn.Module:
    """The encoder of an architecture: ViT (MAE-style) or BeitViT (the CLIP recipe's)."""
    return BeitViT(arch, drop_path) if arch.family == "beit" else ViT(arch, drop_path)


__all__ = ["FAMILIES", "SIZES", "ViTArch", "vit_arch", "ViT", "BeitViT", "build_encoder", "Decoder",
           "DecoderArch"]
