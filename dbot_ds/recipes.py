"""Named runs. Each recipe is a partial config over RunConfig's defaults (the paper's Table A1)."""

from __future__ import annotations

import copy

from dbot_ds.config import ConfigError, deep_merge

RECIPES: dict[str, dict] = {
    # A tiny 2-stage run on CPU with images it generates itself (the README's first command).
    "demo": {
        "deepspeed": "cpu_demo",
        "model": {"size": "vit_demo", "img_size": 32, "drop_path": 0.1,
                  "decoder_width": 64, "decoder_depth": 2, "decoder_heads": 4},
        "batch": {"global_batch": 64, "micro_batch": 32},
        "optim": {"base_lr": 1.5e-3, "warmup_epochs": 1},
        "data": {"synthetic_images": 2048, "num_workers": 1},
        "stages": {"epochs": [4, 4]},
        "log_every": 8,
    },
    # The same, reading WebDataset shards that the generated images are converted to first.
    "demo_shards": {"base": "demo", "data": {"source": "generated_shards", "num_workers": 1}},
    # The paper's defaults: 2 stages x 800 epochs, batch 4096 (3 stages for dense tasks:
    # --set stages.epochs=[800,800,800]). ViT-L/H use a depth-0 random stage-1 teacher.
    "vit_base": {"model": {"size": "vit_base"}, "deepspeed": "vit_base",
                 "batch": {"micro_batch": 256}},
    "vit_large": {"model": {"size": "vit_large"}, "deepspeed": "vit_large",
                  "batch": {"micro_batch": 128}, "teacher": {"random_depth": 0}},
    "vit_huge": {"model": {"size": "vit_huge"}, "deepspeed": "vit_huge",
                 "batch": {"micro_batch": 128}, "teacher": {"random_depth": 0}},
}


def recipe_dict(name: str) -> dict:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    body = copy.deepcopy(RECIPES[name])
    base = body.pop("base", None)
    return deep_merge(recipe_dict(base), {**body, "recipe": name}) if base else {"recipe": name, **body}
