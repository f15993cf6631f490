"""One module per `dbot-ds` command, each with `register(subparsers)`: the top layer, the only
one that puts the others together."""

from __future__ import annotations

import importlib

# In `dbot-ds --help` order. Every module is imported when the parser is built (torch, which
# the configs need, dominates that time; deepspeed adds little to it).
COMMANDS = ("pretrain", "finetune", "probe", "analyze", "export", "slurm", "shards", "bench", "bench_data",
            "recipes")


def register_all(sub) -> None:
    for name in COMMANDS:
        importlib.import_module(f"dbot_ds.commands.{name}").register(sub)
