"""One config system for every command: typed configs (training.py: what every training command
shares; pretrain.py, finetune.py, tools.py: probe and bench), the shared machinery (schema.py:
coercion, `--set`, merging, renamed keys) and named recipes (recipes.py, data).

A config is a recipe's dict, then a JSON file over it, then `--set key=value` overrides.
"""

from __future__ import annotations

from pathlib import Path

from dbot_ds.config.recipes import FINETUNE_RECIPES, RECIPES, recipe_dict
from dbot_ds.config.schema import ConfigError, deep_merge, flatten, from_dict, layered, parse_set, rename_keys
from dbot_ds.config.finetune import FinetuneConfig
from dbot_ds.config.pretrain import RunConfig
from dbot_ds.config.tools import BenchConfig, ProbeConfig
from dbot_ds.config.training import TrainingConfig, paper_drop_path


def load_config(recipe: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] = ()) -> RunConfig:
    """A pre-training run's config."""
    return from_dict(RunConfig, layered(recipe_dict(recipe) if recipe else {}, config_file, overrides))


def load_finetune(recipe: str | None = None, config_file: str | Path | None = None,
                  overrides: list[str] = (), **fields) -> FinetuneConfig:
    """A fine-tuning run's config: the preset, the JSON file, then `fields` (what the command line
    names directly: init, data.train, ... as nested dicts), then the overrides; the first
    release's flat key names are still taken, with a deprecation warning."""
    what = "fine-tuning config"
    data = layered(recipe_dict(recipe, FINETUNE_RECIPES, "fine-tuning recipe") if recipe else {}, config_file, [])
    data = layered(deep_merge(rename_keys(data, FinetuneConfig.RENAMED, what), fields), None, overrides)
    return from_dict(FinetuneConfig, rename_keys(data, FinetuneConfig.RENAMED, what))


__all__ = ["BenchConfig", "ConfigError", "FINETUNE_RECIPES", "FinetuneConfig", "ProbeConfig", "RECIPES", "RunConfig",
           "TrainingConfig", "deep_merge", "flatten", "from_dict", "load_config", "load_finetune", "paper_drop_path",
           "parse_set", "recipe_dict"]
