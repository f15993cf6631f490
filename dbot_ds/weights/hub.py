"""Encoders from the Hugging Face Hub and timm's model zoo, resolved by timm and huggingface_hub:

    hf-hub:ORG/NAME    a timm model repository on the Hub
    timm:NAME          a timm model name with its pretrained weights (vit_base_patch16_224.mae, ...)
    local-dir:PATH     a timm model directory (what `dbot-ds export --format timm` writes)

Compute nodes often have no network: with HF_HUB_OFFLINE=1 the weights come from the local
Hugging Face cache (HF_HOME / HF_HUB_CACHE), filled beforehand on a machine that has network.
"""

from __future__ import annotations

from torch import nn

from dbot_ds.input_norms import INPUT_NORMS
from dbot_ds.weights.export import ExportError
from dbot_ds.weights.layouts import encoder_from_state

PREFIXES = ("hf-hub:", "timm:", "local-dir:")


def is_hub_source(source: str) -> bool:
    return str(source).startswith(PREFIXES)


def timm_pretrained(source: str) -> nn.Module:
    """timm's model of `source` with its pretrained weights, features only."""
    import timm
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    name = source.removeprefix("timm:")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0).eval()
    except LocalEntryNotFoundError as e:
        raise ExportError(
            f"{source}: its weights are neither in the local Hugging Face cache nor reachable (offline compute "
            f"nodes: HF_HUB_OFFLINE=1). Fetch them where there is network, into the HF_HOME this node reads: "
            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\"") from e
    except (HfHubHTTPError, RuntimeError, OSError) as e:  # unknown repository or model name, unreadable dir
        raise ExportError(f"{source}: timm cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def input_norm_of_cfg(model: nn.Module) -> str | None:
    """The INPUT_NORMS key whose mean/std the model's pretrained_cfg states, if any."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", ())), tuple(cfg.get("std", ()))
    return next((k for k, (m, s) in INPUT_NORMS.items()
                 if len(m) == len(mean) == 3 and all(abs(a - b) < 1e-3 for a, b in zip((*m, *s), (*mean, *std)))),
                None)


def import_hub(source: str) -> tuple[nn.Module, dict]:
    """Our encoder from a hub / timm / local-dir source (a ViT), with the import report."""
    model = timm_pretrained(source)
    blocks = getattr(model, "blocks", None)
    heads = blocks[0].attn.num_heads if blocks is not None and len(blocks) else None
    encoder, report = encoder_from_state(model.state_dict(), source, heads, input_norm_of_cfg(model))
    return encoder, {**report, "layout": f"timm ({source})"}
