"""An export's encoder as timm weights: timm's key names, the kwargs that rebuild it (timm's
VisionTransformer, or Beit for a recipe-⌘ student) and a model card."""

from __future__ import annotations

import json
from pathlib import Path

from dbot_ds.method.classifier import timm_kwargs
from dbot_ds.weights.export import encoder_state, read_export
from dbot_ds.weights.layouts import write_timm_weights


def timm_architecture(encoder: dict) -> tuple[str, str]:
    """(timm class, a timm model name whose pretrained_cfg fits) for an encoder."""
    if encoder.get("family") == "beit":
        return "timm.models.beit.Beit", "beit_base_patch16_224"
    return "timm.models.vision_transformer.VisionTransformer", "vit_base_patch16_224"


def model_card(meta: dict, kwargs: dict, metrics: dict | None) -> str:
    cfg = meta.get("config", {})
    data = cfg.get("data", {})
    _, timm_name = timm_architecture(meta["encoder"])
    lines = [f"# dBOT ViT encoder (recipe `{meta['recipe']}`, stage {meta['stage']})", "",
             "Pre-trained with dbot-ds: masked knowledge distillation with bootstrapped teachers.", "",
             f"- architecture: ViT, width {kwargs['embed_dim']}, depth {kwargs['depth']}, heads "
             f"{kwargs['num_heads']}, patch {kwargs['patch_size']}, {kwargs['img_size']} px",
             f"- training: stage {meta['stage']}, {meta.get('epochs', '?')} epochs ({meta.get('steps')} steps), "
             f"global batch {cfg.get('batch', {}).get('global_batch')}, mask ratio {cfg.get('mask', {}).get('ratio')}",
             f"- data: {data.get('source')} {data.get('shards', '')}".rstrip(),
             f"- teacher sha256: {meta.get('teacher_sha256')}", f"- weights sha256 (dbot-ds export): {meta['sha256']}",
             "", "```python", "import timm",
             f"model = timm.create_model('{timm_name}', pretrained=True, num_classes=0,",
             "    pretrained_cfg_overlay=dict(file='model.safetensors'),",
             f"    **{ {k: v for k, v in kwargs.items() if k != 'num_classes'} })", "```"]
    if metrics:
        lines += ["", "## Metrics", "", *[f"- {k}: {v}" for k, v in metrics.items()]]
    return "\n".join(lines) + "\n"


def export_timm(source: str | Path, out: str | Path, metrics: dict | None = None) -> Path:
    """An export's encoder weights with timm's key names, a config and a model card: loadable
    with timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...), **kwargs)."""
    state, meta = read_export(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_timm_weights(out / "model.safetensors", encoder_state(state), meta["encoder"]["heads"],
                       source_sha256=meta["sha256"])
    kwargs = timm_kwargs(meta["encoder"])
    (out / "timm_config.json").write_text(json.dumps(
        {"architecture": timm_architecture(meta["encoder"])[0], "kwargs": kwargs, "stage": meta["stage"],
         "recipe": meta["recipe"], "source_sha256": meta["sha256"]}, indent=2) + "\n")
    (out / "README.md").write_text(model_card(meta, kwargs, metrics))
    return out / "model.safetensors"
