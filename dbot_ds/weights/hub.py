"""Encoders from the Hugging Face Hub and timm's model zoo, resolved by timm and huggingface_hub:

    hf-hub:ORG/NAME    a timm model repository on the Hub
    timm:NAME          a timm model name with its pretrained weights (vit_base_patch16_224.mae, ...)
    local-dir:PATH     a timm model directory (what `dbot-ds export --format timm` writes)

Compute nodes often have no network: with HF_HUB_OFFLINE=1 the weights come from the local
Hugging Face cache (HF_HOME / HF_HUB_CACHE), filled beforehand on a machine that has network.

The architecture is read from the live timm model, not assumed: its activation and LayerNorm
epsilon (a CLIP tower's QuickGELU), its head (CLIP's projection, kept as a weights file's is),
and for a timm Beit our BEiT-style family. What our encoders cannot represent is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from dbot_ds.input_norms import INPUT_NORMS
from dbot_ds.models import ViTArch, build_encoder
from dbot_ds.weights.export import ExportError, load_fitting
from dbot_ds.weights.layouts import encoder_from_state

PREFIXES = ("hf-hub:", "timm:", "local-dir:")
ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu"}  # timm's module -> our ViTArch.act
BEIT_EPS = 1e-6  # models/beit.py's LayerNorms


def is_hub_source(source: str) -> bool:
    return str(source).startswith(PREFIXES)


def read_config(path: Path, source: str) -> dict:
    """A timm model directory's config.json, checked for what timm reads first."""
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise ExportError(f"{source}: no readable {path} ({e.strerror or e}): point local-dir: to a timm model "
                          "directory (what `dbot-ds export --format timm` writes)") from e
    except ValueError as e:
        raise ExportError(f"{source}: {path} is not valid JSON ({e}); re-export the model directory") from e
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ExportError(f"{source}: {path} names no architecture (a string `architecture`): not a timm model "
                          "directory; re-export it with `dbot-ds export --format timm`")
    return config


def check_source(source: str) -> None:
    """What timm would fail on with a traceback: a bad repository id, a broken local config.json."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith("hf-hub:"):
        repo_id = source.removeprefix("hf-hub:").split("@")[0]
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ExportError(f"{source}: {repo_id!r} is not a Hugging Face repository id ({e}); "
                              "write hf-hub:ORG/NAME") from e
    elif source.startswith("local-dir:"):
        read_config(Path(source.removeprefix("local-dir:")) / "config.json", source)


def timm_pretrained(source: str) -> nn.Module:
    """timm's model of `source` with its pretrained weights and head (a CLIP tower's head is its
    projection); in eval mode."""
    import timm
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    check_source(source)
    name = source.removeprefix("timm:")
    try:
        return timm.create_model(name, pretrained=True).eval()
    except LocalEntryNotFoundError as e:
        raise ExportError(
            f"{source}: its weights are neither in the local Hugging Face cache nor reachable (offline compute "
            f"nodes: HF_HUB_OFFLINE=1). Fetch them where there is network, into the HF_HOME this node reads: "
            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"") from e
    # unknown repository or model name, unreadable dir, a config.json timm cannot use
    except (HfHubHTTPError, RuntimeError, OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{source}: timm cannot load it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def input_norm_of_cfg(model: nn.Module, source: str) -> str:
    """The INPUT_NORMS key whose mean/std the model's pretrained_cfg states. Another normalisation
    is refused: a teacher sees its inputs renormalised to one of these, and a guess would feed it
    images normalised otherwise than it was trained."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", ())), tuple(cfg.get("std", ()))
    found = next((k for k, (m, s) in INPUT_NORMS.items()
                  if len(m) == len(mean) == len(std) == 3
                  and all(abs(a - b) < 1e-3 for a, b in zip((*m, *s), (*mean, *std)))), None)
    if found is None:
        known = "; ".join(f"{k}: mean {m}, std {s}" for k, (m, s) in INPUT_NORMS.items())
        raise ExportError(f"{source}: its pretrained_cfg normalises images with mean {mean or None}, std {std or None}, "
                          f"none of the normalisations dbot-ds knows ({known}); use a model trained with one of them")
    return found


def layer_norms(model: nn.Module) -> list[nn.Module]:
    """The encoder's normalisation layers (not a classifier's fc_norm)."""
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1].startswith(("norm", "ln"))
            and not isinstance(m, nn.Identity)]


def act_name(act: nn.Module) -> str:
    """GELU, QuickGELU, ...; a tanh-approximated GELU is not ours (nn.GELU's default is exact)."""
    approximate = getattr(act, "approximate", "none")
    return type(act).__name__ + (f"(approximate={approximate})" if approximate != "none" else "")


def act_and_eps(model: nn.Module, source: str) -> dict:
    """ViTArch's act and norm_eps as the live model has them; what ours cannot build is refused."""
    acts = {act_name(b.mlp.act) for b in model.blocks if hasattr(b.mlp, "act")}
    unknown = sorted(acts - set(ACTIVATIONS))
    if unknown or len(acts) != 1:
        raise ExportError(f"{source}: its MLP activation is {', '.join(sorted(acts)) or 'not a single module'}; "
                          f"dbot-ds's ViT has {' or '.join(ACTIVATIONS)} only")
    norms = layer_norms(model)
    others = sorted({type(m).__name__ for m in norms if not isinstance(m, nn.LayerNorm)})
    eps = {m.eps for m in norms if isinstance(m, nn.LayerNorm)}
    if others or len(eps) > 1:
        raise ExportError(f"{source}: its normalisation layers are {', '.join(others) or f'LayerNorms of eps {sorted(eps)}'}; "
                          "dbot-ds's ViT has LayerNorms of one epsilon")
    return {"act": ACTIVATIONS[acts.pop()], **({"norm_eps": eps.pop()} if eps else {})}


def check_vit_tokens(model: nn.Module, source: str) -> None:
    """A cls token with a position of its own, no register tokens: our ViT's token layout."""
    if not getattr(model, "has_class_token", True) or getattr(model, "num_reg_tokens", 0) \
            or getattr(model, "no_embed_class", False):
        raise ExportError(f"{source}: a ViT without a cls token, with register tokens or without a cls position; "
                          "dbot-ds's ViT has one cls token with its own position embedding")


def vit_state(model: nn.Module) -> dict:
    """The model's weights as a weights file holds them; a classifier head (a bias) is not
    CLIP's projection (timm writes that with a zero bias) and is left out here."""
    state = model.state_dict()
    bias = state.get("head.bias")
    if "norm_pre.weight" in state and bias is not None and bias.abs().max() > 0:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return state


def recorded_model_args(model: nn.Module, source: str) -> dict:
    """The timm arguments the model was built with: timm >= 1.0.2x keeps them on the model, older
    releases only in the model directory's config.json (local, or in the Hugging Face cache)."""
    from huggingface_hub import try_to_load_from_cache

    args = getattr(model, "pretrained_model_args", None) or getattr(model, "_model_args", None)
    if args:
        return dict(args)
    if source.startswith("local-dir:"):
        path = Path(source.removeprefix("local-dir:")) / "config.json"
    elif source.startswith("hf-hub:"):
        repo_id, _, revision = source.removeprefix("hf-hub:").partition("@")
        path = try_to_load_from_cache(repo_id, "config.json", revision=revision or None)
        path = Path(path) if isinstance(path, str) else None
    else:
        return {}
    return (read_config(path, source).get("model_args") or {}) if path else {}


def beit_arch(model: nn.Module, source: str) -> ViTArch:
    """Our BEiT-style encoder's architecture for a timm Beit, if it is one we build: one shared
    relative position bias, no absolute positions, layer scale, a final norm."""
    blocks = model.blocks
    per_block_bias = any(getattr(b.attn, "relative_position_bias_table", None) is not None for b in blocks)
    if model.pos_embed is not None or model.rel_pos_bias is None or per_block_bias \
            or isinstance(model.norm, nn.Identity) or not len(blocks) or blocks[0].gamma_1 is None:
        raise ExportError(f"{source}: a timm Beit other than dbot-ds's BEiT-style encoder (one relative position "
                          "bias shared by all blocks, no absolute positions, layer scale, a final norm)")
    layer_scale = recorded_model_args(model, source).get("init_values")
    if not layer_scale:
        raise ExportError(f"{source}: a BEiT-style model whose config.json records no model_args.init_values "
                          "(its layer scale); re-export it with `dbot-ds export --format timm`")
    patch, img = model.patch_embed.patch_size, model.patch_embed.img_size
    if patch[0] != patch[1] or img[0] != img[1]:
        raise ExportError(f"{source}: patches {tuple(patch)} on {tuple(img)} px images; dbot-ds's encoders are square")
    act = act_and_eps(model, source)
    if act != {"act": "gelu", "norm_eps": BEIT_EPS}:  # models/beit.py builds these alone
        raise ExportError(f"{source}: a Beit with {act}; dbot-ds's BEiT-style encoder has GELU and LayerNorms "
                          f"of eps {BEIT_EPS}")
    width = model.embed_dim
    try:
        return ViTArch(width=width, depth=len(blocks), heads=blocks[0].attn.num_heads, patch_size=patch[0],
                       img_size=img[0], mlp_ratio=blocks[0].mlp.fc1.out_features / width, family="beit",
                       layer_scale=float(layer_scale))
    except ValueError as e:
        raise ExportError(f"{source}: describes no BEiT-style encoder of dbot-ds ({e})") from e


def import_beit(model: nn.Module, source: str) -> tuple[nn.Module, dict]:
    arch = beit_arch(model, source)
    encoder = build_encoder(arch)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    load_fitting(encoder, state, source)
    return encoder, {"layout": "timm beit", "mapped": len(state), "converted": 0, "ignored": [],
                     "architecture": arch.to_dict(), "projection": None}


def import_vit(model: nn.Module, source: str) -> tuple[nn.Module, dict]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ExportError(f"{source}: a {type(model).__name__}, not a ViT: dbot-ds imports timm's "
                          "VisionTransformer and its own BEiT-style Beit")
    check_vit_tokens(model, source)
    heads = blocks[0].attn.num_heads if len(blocks) else None
    return encoder_from_state(vit_state(model), source, heads,
                              arch_from_model=act_and_eps(model, source) if len(blocks) else {})


def import_hub(source: str) -> tuple[nn.Module, dict]:
    """Our encoder from a hub / timm / local-dir source (a ViT or our BEiT-style Beit), with the
    import report."""
    from timm.models.beit import Beit

    model = timm_pretrained(source)
    norm = input_norm_of_cfg(model, source)
    encoder, report = import_beit(model, source) if isinstance(model, Beit) else import_vit(model, source)
    return encoder, {**report, "input_norm": norm, "layout": f"timm ({source})"}

