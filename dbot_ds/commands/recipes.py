"""`dbot-ds recipes`: the named pre-training recipes, the paper's row each reproduces, and their
settings over the defaults; `--finetune`: the fine-tuning presets."""

from __future__ import annotations

import json

from dbot_ds.config.recipes import FINETUNE_RECIPES, PAPER_ROWS, RECIPES


def main(args) -> int:
    if args.finetune:
        for name, body in FINETUNE_RECIPES.items():
            print(f"{name:24s} {json.dumps(body)}")
        return 0
    for name, body in RECIPES.items():
        print(f"{name:24s} {PAPER_ROWS.get(name, ''):34s} {json.dumps(body)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the named recipes")
    p.add_argument("--finetune", action="store_true", help="the fine-tuning presets instead")
    p.set_defaults(func=main)
