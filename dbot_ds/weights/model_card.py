"""The model card of a timm export: YAML front matter (huggingface_hub's ModelCardData) and a
short body, with the metrics of `--metrics` (a JSON object of numbers, or `dbot-ds probe --json`
output, whose row of the export is taken)."""

from __future__ import annotations

import json
from pathlib import Path

from dbot_ds.config import ConfigError

LICENSE = "apache-2.0"  # dbot-ds's own; what the pre-training data allows is the user's to state
PAPER = "https://arxiv.org/abs/2209.10724"
NOT_METRICS = {"seconds"}  # numbers of a probe row that describe the run, not the model


def card_data(metrics: dict | None):
    from huggingface_hub import ModelCardData

    # no `datasets:` entry: neither the config nor a shard manifest names the data set its
    # shards were made from, and the card must not claim one
    return ModelCardData(library_name="timm", license=LICENSE, pipeline_tag="image-feature-extraction",
                         tags=["image-feature-extraction", "timm", "dbot", "masked-image-modeling"],
                         metrics=sorted(metrics) if metrics else None)


def model_card(meta: dict, architecture: str, kwargs: dict, metrics: dict | None, name: str,
               repo_id: str | None = None) -> str:
    from huggingface_hub import ModelCard

    cfg = meta.get("config", {})
    data = cfg.get("data", {})
    hub_id = repo_id or f"ORG/{name}"
    body = [f"# {name}", "",
            f"A ViT encoder pre-trained with dbot-ds (dBOT, masked knowledge distillation with bootstrapped "
            f"teachers, [paper]({PAPER})): recipe `{meta['recipe']}`, stage {meta['stage']}.", "",
            "## Model Details", "",
            f"- architecture: {architecture} with width {kwargs['embed_dim']}, "
            f"depth {kwargs['depth']}, {kwargs['num_heads']} heads, patch {kwargs['patch_size']}, {kwargs['img_size']} px",
            f"- training: {meta.get('epochs', '?')} epochs ({meta.get('steps')} steps), global batch "
            f"{cfg.get('batch', {}).get('global_batch')}, mask ratio {cfg.get('mask', {}).get('ratio')}",
            f"- data: {data.get('source')} {data.get('shards') or ''}".rstrip(),
            f"- teacher sha256: {meta.get('teacher_sha256')}",
            f"- weights sha256 (the dbot-ds export): {meta['sha256']}", "",
            "## Usage", "", "```python", "import timm",
            f"model = timm.create_model('hf-hub:{hub_id}', pretrained=True)  # or 'local-dir:PATH'",
            "features = model.forward_features(images)  # normalised as pretrained_cfg's mean / std", "```"]
    if metrics:
        body += ["", "## Metrics", "", *[f"- {k}: {v}" for k, v in metrics.items()]]
    return str(ModelCard(f"---\n{card_data(metrics).to_yaml()}\n---\n" + "\n".join(body) + "\n"))


def probe_metrics(rows: list, source: Path, path: str) -> dict:
    """The numbers of the row(s) `dbot-ds probe --json` wrote for the exported encoder."""
    def is_source(row) -> bool:
        encoder = row.get("encoder") if isinstance(row, dict) else None
        return isinstance(encoder, str) and Path(encoder).exists() and Path(encoder).resolve() == source.resolve()

    mine = [row for row in rows if is_source(row)]
    if not mine:
        probed = [row.get("encoder") for row in rows if isinstance(row, dict)]
        raise ConfigError(f"--metrics {path}: a probe result with no row for {source} (its rows: {probed}); "
                          "probe this export, or give a JSON object of its metrics")
    metrics = {k: v for row in mine for k, v in row.items() if is_number(v) and k not in NOT_METRICS}
    conflicting = [k for k in metrics if len({row.get(k) for row in mine}) > 1]
    if conflicting:
        raise ConfigError(f"--metrics {path}: several rows for {source} with different {', '.join(conflicting)}: "
                          "keep the one to publish")
    return metrics


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str, source: str | Path) -> dict:
    """--metrics: a JSON object of numbers, or `dbot-ds probe --json` output (its rows of `source`)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--metrics {path}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:
        raise ConfigError(f"--metrics {path} is not valid JSON ({e}): give a JSON object of numbers "
                          "or the output of `dbot-ds probe --json`") from e
    if isinstance(data, list):
        return probe_metrics(data, Path(source), path)
    if not isinstance(data, dict) or not data or not all(is_number(v) for v in data.values()):
        raise ConfigError(f"--metrics {path}: expected a JSON object of numbers (e.g. {{\"knn_top1\": 0.42}}) "
                          "or the output of `dbot-ds probe --json`")
    return data
