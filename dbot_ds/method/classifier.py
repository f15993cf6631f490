"""The fine-tuning classifier around a pre-trained encoder, with timm's building blocks:
VisionTransformer for an MAE-style encoder, Beit (a relative position bias per block, each
starting from the shared one, as BEiT fine-tunes) for a BEiT-style one; average-pooled patch
tokens into fc_norm and a linear head; layer-wise lr decay groups."""

from __future__ import annotations

import torch
from torch import nn

from dbot_ds.config import ConfigError, FinetuneConfig
from dbot_ds.models import ViTArch

# BEiT's fine-tuning skip list (its VisionTransformer.no_weight_decay): the per-block relative
# position tables decay, unlike in timm's Beit.no_weight_decay.
BEIT_NO_WEIGHT_DECAY = {"pos_embed", "cls_token"}


def timm_kwargs(arch: dict) -> dict:
    """Arguments of timm's VisionTransformer (or Beit, for the beit family) that rebuild the
    encoder (features only)."""
    kwargs = {"img_size": arch["img_size"], "patch_size": arch["patch_size"], "embed_dim": arch["width"],
              "depth": arch["depth"], "num_heads": arch["heads"], "mlp_ratio": arch["mlp_ratio"], "num_classes": 0}
    if arch.get("family") == "beit":
        return {**kwargs, "global_pool": "", "use_abs_pos_emb": False, "use_shared_rel_pos_bias": True,
                "use_rel_pos_bias": False, "init_values": arch["layer_scale"]}
    if arch.get("pre_norm"):
        kwargs["pre_norm"] = True
    return kwargs


def check_recipe_fits(cfg: FinetuneConfig, arch: ViTArch, source: str) -> None:
    """The CLIP presets are for BEiT-style students, the others for MAE-style ViTs."""
    if cfg.recipe == "custom":
        return
    wants = "beit" if cfg.recipe.startswith("clip_") else "vit"
    if wants != arch.family:
        other = "a clip_vit_* recipe" if arch.family == "beit" else "a vit_* recipe"
        raise ConfigError(f"--recipe {cfg.recipe} fine-tunes {wants}-family students, but {source} is a "
                          f"{arch.family}-family encoder: use {other}")


def build_classifier(encoder: nn.Module, num_classes: int, drop_path: float, head_init_std: float = 0.01) -> nn.Module:
    """timm's classifier (avg pool, fc_norm, head) holding the encoder's weights."""
    arch: ViTArch = encoder.arch
    if arch.pre_norm or arch.proj_dim:
        raise ConfigError("fine-tuning takes dbot-ds students and MAE-style ViTs; this encoder is a CLIP tower")
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("norm.")}  # fc_norm instead
    if arch.family == "beit":
        from timm.models.beit import Beit

        model = Beit(**{**timm_kwargs(arch.to_dict()), "num_classes": num_classes, "global_pool": "avg",
                        "use_shared_rel_pos_bias": False, "use_rel_pos_bias": True}, drop_path_rate=drop_path,
                     head_init_scale=0.001)
        shared = state.pop("rel_pos_bias.relative_position_bias_table")
        state.update({f"blocks.{i}.attn.relative_position_bias_table": shared.clone() for i in range(arch.depth)})
    else:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**{**timm_kwargs(arch.to_dict()), "num_classes": num_classes},
                                  global_pool="avg", drop_path_rate=drop_path)
        torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)  # the authors' main_finetune.py
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
        raise ConfigError(f"the encoder does not fit a timm classifier: missing {missing}, unexpected {unexpected}")
    return model


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """timm's groups: lr_scale = layer_decay ** (layers above), no weight decay on 1-D tensors
    and the model's tokens (BEiT's list for a Beit classifier)."""
    from timm.models.beit import Beit
    from timm.optim import param_groups_layer_decay

    skip = BEIT_NO_WEIGHT_DECAY if isinstance(model, Beit) else model.no_weight_decay()
    return param_groups_layer_decay(model, weight_decay, skip, layer_decay=layer_decay)
