"""An export's encoder as a timm model directory, the Hugging Face Hub way: timm's save_for_hf
(config.json with the architecture and its arguments, model.safetensors) and a model card with
YAML front matter (huggingface_hub's ModelCardData), so `timm.create_model("local-dir:OUT",
pretrained=True)` or, once pushed, `timm.create_model("hf-hub:ORG/NAME", pretrained=True)` rebuilds
it with no further arguments."""

from __future__ import annotations

from pathlib import Path

from dbot_ds.input_norms import INPUT_NORMS
from dbot_ds.method.classifier import timm_kwargs
from dbot_ds.weights.export import encoder_state, load_fitting, read_export

# a registered timm architecture per family; the export's own sizes go in its model_args
ARCHITECTURES = {"vit": "vit_base_patch16_224", "beit": "beit_base_patch16_224"}
LICENSE = "apache-2.0"  # dbot-ds's own; what the pre-training data allows is the user's to state
PAPER = "https://arxiv.org/abs/2209.10724"


def timm_model(meta: dict, state: dict):
    """timm's model for the export's encoder (features only), holding its weights (strictly)."""
    import timm

    arch = meta["encoder"]
    model = timm.create_model(ARCHITECTURES[arch.get("family", "vit")], pretrained=False, **timm_kwargs(arch))
    load_fitting(model, encoder_state(state), "the export's encoder in timm's layout")
    return model.eval()


def model_card(meta: dict, kwargs: dict, metrics: dict | None, name: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = meta.get("config", {})
    data = cfg.get("data", {})
    card = ModelCardData(library_name="timm", license=LICENSE, pipeline_tag="image-feature-extraction",
                         tags=["image-feature-extraction", "timm", "dbot", "masked-image-modeling"],
                         datasets=["imagenet-1k"] if data.get("source") == "shards" else None,
                         metrics=sorted(metrics) if metrics else None)
    body = [f"# {name}", "",
            f"A ViT encoder pre-trained with dbot-ds (dBOT, masked knowledge distillation with bootstrapped "
            f"teachers, [paper]({PAPER})): recipe `{meta['recipe']}`, stage {meta['stage']}.", "",
            "## Model Details", "",
            f"- architecture: {ARCHITECTURES[meta['encoder'].get('family', 'vit')]} with width {kwargs['embed_dim']}, "
            f"depth {kwargs['depth']}, {kwargs['num_heads']} heads, patch {kwargs['patch_size']}, {kwargs['img_size']} px",
            f"- training: {meta.get('epochs', '?')} epochs ({meta.get('steps')} steps), global batch "
            f"{cfg.get('batch', {}).get('global_batch')}, mask ratio {cfg.get('mask', {}).get('ratio')}",
            f"- data: {data.get('source')} {data.get('shards', '')}".rstrip(),
            f"- teacher sha256: {meta.get('teacher_sha256')}",
            f"- weights sha256 (the dbot-ds export): {meta['sha256']}", "",
            "## Usage", "", "```python", "import timm",
            f"model = timm.create_model('hf-hub:ORG/{name}', pretrained=True)  # or 'local-dir:PATH'",
            "features = model.forward_features(images)  # normalised as pretrained_cfg's mean / std", "```"]
    if metrics:
        body += ["", "## Metrics", "", *[f"- {k}: {v}" for k, v in metrics.items()]]
    return str(ModelCard(f"---\n{card.to_yaml()}\n---\n" + "\n".join(body) + "\n"))


def export_timm(source: str | Path, out: str | Path, metrics: dict | None = None) -> Path:
    """The export's encoder as a timm model directory (see above); returns the directory."""
    from timm.models import save_for_hf

    state, meta = read_export(source)
    out = Path(out)
    mean, std = INPUT_NORMS[meta.get("input_norm", "imagenet")]
    pretrained_cfg = {"mean": mean, "std": std, "tag": f"dbot_{meta['recipe']}_stage{meta['stage']}",
                      "license": LICENSE, "interpolation": "bicubic", "crop_pct": 0.875}
    save_for_hf(timm_model(meta, state), str(out), model_config={"pretrained_cfg": pretrained_cfg},
                safe_serialization=True)
    (out / "README.md").write_text(model_card(meta, timm_kwargs(meta["encoder"]), metrics, out.name))
    return out


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a model directory with huggingface_hub (the token from `huggingface-cli login` or
    HF_TOKEN); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add a dbot-ds encoder"))
