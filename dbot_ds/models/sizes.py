"""The only place ViT sizes live, and how many patches of one the encoder sees at a mask ratio."""

from __future__ import annotations

import dataclasses


FAMILIES = ("vit", "beit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTArch:
    """Shape of one ViT encoder; enough to rebuild it (stored in every export's meta.json)."""

    width: int
    depth: int
    heads: int
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    pre_norm: bool = False     # a LayerNorm before the blocks (CLIP)
    patch_bias: bool = True    # CLIP's patch embedding has no bias
    act: str = "gelu"          # "quick_gelu" for OpenAI CLIP weights
    norm_eps: float = 1e-6     # LayerNorm epsilon: timm's ViT default; CLIP's towers use 1e-5
    family: str = "vit"        # "vit": timm VisionTransformer layout, MAE init; "beit": models/beit.py
    layer_scale: float | None = None  # beit: initial layer-scale value (0.1 in the CLIP recipe)
    proj_dim: int | None = None       # CLIP's visual projection `proj` (width -> proj_dim, no bias)

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}; "
                "pick sizes whose ratio is an integer (e.g. 224/16, 224/14)")
        if self.width % max(self.heads, 1):
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")
        if self.act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be gelu or quick_gelu, got {self.act!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"model family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "beit" and (self.pre_norm or not self.patch_bias or self.act != "gelu"
                                      or self.proj_dim or not self.layer_scale):
            raise ValueError("a beit-family encoder has no pre-norm, no projection, a patch bias, GELU and "
                             "layer scale (model.layer_scale: its initial value)")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# name -> (width, depth, heads, patch_size). Tiny sizes keep every test on CPU.
SIZES: dict[str, tuple[int, int, int, int]] = {
    "tiny_test": (32, 2, 2, 8),
    "vit_demo": (96, 4, 4, 4),
    "vit_tiny": (192, 12, 3, 16),
    "vit_small": (384, 12, 6, 16),
    "vit_base": (768, 12, 12, 16),
    "vit_large": (1024, 24, 16, 16),
    "vit_huge": (1280, 32, 16, 14),
}


def vit_arch(size: str, *, img_size: int = 224, patch_size: int | None = None, family: str = "vit",
             layer_scale: float | None = None) -> ViTArch:
    """ViTArch for a named size; patch and image size may be overridden."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    width, depth, heads, default_patch = SIZES[size]
    return ViTArch(width=width, depth=depth, heads=heads, patch_size=patch_size or default_patch,
                   img_size=img_size, family=family, layer_scale=layer_scale)


def num_visible(num_patches: int, ratio: float) -> int:
    """Patches MAE's asymmetric encoder sees at a mask ratio (its rounding)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    keep = int(num_patches * (1 - ratio))  # MAE's rounding
    if keep < 1:
        raise ValueError(f"mask ratio {ratio} leaves no visible patch out of {num_patches}")
    return keep
