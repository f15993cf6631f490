"""`dbot-ds export`: resume checkpoint -> stage export; stage export -> timm encoder weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dbot_ds import checkpoint
from dbot_ds.config import from_dict, RunConfig
from dbot_ds.export import META, read_export, write_export
from dbot_ds.stages import export_meta
from dbot_ds.student import Student
from dbot_ds.teacher import encoder_state
from dbot_ds.teacher_import import HEADS_KEY


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Consolidate a (ZeRO-sharded) resume checkpoint into a stage export at `out`."""
    ckpt = Path(ckpt)
    state_info = checkpoint.read_state(ckpt)
    cfg = from_dict(RunConfig, state_info["config"])
    state = checkpoint.consolidated_student_state(ckpt)
    width = state["head.weight"].shape[0]
    with torch.device("meta"):  # for its key names: no weights allocated or initialised
        student = Student(cfg.model.encoder_arch(), cfg.model.decoder_arch(), width)
    state.update(student.fixed_buffers())
    missing = set(student.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f"{ckpt}: the checkpoint lacks {sorted(missing)}")
    write_export(out, state, export_meta(cfg, stage=state_info["stage"], steps=state_info["step"],
                                         teacher_sha256=state_info["teacher"], target_width=width,
                                         from_checkpoint=str(ckpt)))
    return Path(out)


def timm_kwargs(encoder: dict) -> dict:
    """Arguments of timm's VisionTransformer (or Beit, for the beit family) that rebuild the
    encoder (features only)."""
    kwargs = {"img_size": encoder["img_size"], "patch_size": encoder["patch_size"],
              "embed_dim": encoder["width"], "depth": encoder["depth"], "num_heads": encoder["heads"],
              "mlp_ratio": encoder["mlp_ratio"], "num_classes": 0}
    if encoder.get("family") == "beit":
        return {**kwargs, "global_pool": "", "use_abs_pos_emb": False, "use_shared_rel_pos_bias": True,
                "init_values": encoder["layer_scale"]}
    if encoder.get("pre_norm"):
        kwargs["pre_norm"] = True
    return kwargs


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
    """Encoder weights with timm's key names, a config and a model card: loadable with
    timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...), **kwargs)."""
    source = Path(source)
    if not (source / META).is_file():  # a resume checkpoint: consolidate it first
        source = export_checkpoint(source, Path(out) / "dbot_export")
    state, meta = read_export(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state(state), str(out / "model.safetensors"),
              metadata={"format": "pt", "source_sha256": meta["sha256"], HEADS_KEY: str(meta["encoder"]["heads"])})
    kwargs = timm_kwargs(meta["encoder"])
    (out / "timm_config.json").write_text(json.dumps(
        {"architecture": timm_architecture(meta["encoder"])[0], "kwargs": kwargs, "stage": meta["stage"],
         "recipe": meta["recipe"], "source_sha256": meta["sha256"]}, indent=2) + "\n")
    (out / "README.md").write_text(model_card(meta, kwargs, metrics))
    return out / "model.safetensors"
