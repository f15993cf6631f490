"""Architectures only: no DeepSpeed, no torch.distributed, no training state."""

from dbot_ds.models.sizes import SIZES, ViTArch, vit_arch
from dbot_ds.models.vit import ViT
from dbot_ds.models.decoder import Decoder, DecoderArch

__all__ = ["SIZES", "ViTArch", "vit_arch", "ViT", "Decoder", "DecoderArch"]
