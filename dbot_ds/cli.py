"""`dbot-ds pretrain | export | shards | recipes`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dbot_ds.config import ConfigError, load_config
from dbot_ds.export import ExportError


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="a named recipe (see `dbot-ds recipes`); default: the paper's "
                   "defaults (ViT-B/16, 2 x 800 epochs)")
    p.add_argument("--config", help="a JSON run config, applied over the recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set mask.ratio=0.8 (repeatable)")


def cmd_pretrain(args) -> None:
    from dbot_ds.engine import shutdown_distributed
    from dbot_ds.train import pretrain

    cfg = load_config(args.recipe, args.config, args.set)
    from dbot_ds.distributed import world_from_env

    exports = pretrain(cfg, args.out, resume=args.resume, only_stage=args.stage)
    shutdown_distributed()  # on success only: after a failure on one rank a barrier would hang
    if world_from_env().is_main:
        for path in exports:
            print(f"stage export: {path}")


def cmd_export(args) -> None:
    from dbot_ds.export_cmd import export_checkpoint, export_timm

    if args.format == "timm":
        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        path = export_timm(args.source, args.out, metrics if isinstance(metrics, dict) else {"results": metrics})
    else:
        path = export_checkpoint(args.source, args.out)
    print(f"wrote {path}")


def cmd_recipes(args) -> None:
    from dbot_ds.recipes import PAPER_ROWS, RECIPES

    for name, body in RECIPES.items():
        print(f"{name:24s} {PAPER_ROWS.get(name, ''):34s} {json.dumps(body)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbot-ds", description=__doc__)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is in the env too.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="dBOT pre-training, all stages (resumable)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="run directory (exports, checkpoints, logs)")
    p.add_argument("--resume", default="auto",
                   help="auto: newest complete checkpoint in --out (default); none; or a checkpoint dir")
    p.add_argument("--stage", type=int, help="run only this stage (1-based; a Slurm stage job): its "
                   "teacher must be the previous stage's export; exits at once if the stage is done")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="a resume checkpoint or stage export -> export / timm weights")
    p.add_argument("source", help="a checkpoint dir (<run>/checkpoints/<tag>) or a stage export dir")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["dbot", "timm"], default="dbot")
    p.add_argument("--metrics", help="a JSON of results (e.g. from dbot-ds probe) for the model card")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("shards", help="WebDataset shards: convert, verify, inspect, index")
    from data_tools.cli import add_commands
    add_commands(p.add_subparsers(dest="shards_command", required=True))

    p = sub.add_parser("slurm", help="submit the stages as a chain of Slurm jobs")
    from dbot_ds.slurm import add_commands as add_slurm_commands
    add_slurm_commands(p.add_subparsers(dest="slurm_command", required=True))

    from dbot_ds.bench import add_parser as add_bench_parser
    add_bench_parser(sub)
    from dbot_ds.probe import add_parser as add_probe_parser
    add_probe_parser(sub)
    from dbot_ds.analyze import add_parser as add_analyze_parser
    add_analyze_parser(sub)
    from dbot_ds.finetune import add_parser as add_finetune_parser
    add_finetune_parser(sub)

    p = sub.add_parser("bench-data", help="shard loader images/s vs raw Pillow decode (ratios)")
    p.add_argument("--images", type=int, default=600, help="generated full-size JPEGs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, help="loader workers for the total rate (default: all cores)")
    p.add_argument("--work-dir", help="where the temporary shards go (default: the system temp dir)")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=lambda a: __import__("dbot_ds.bench_data", fromlist=["main"]).main(a))

    p = sub.add_parser("recipes", help="list the named recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dbot_ds.data.shards import ShardError

    try:
        return args.func(args) or 0
    except (ConfigError, ExportError, ShardError, FileNotFoundError) as e:
        print(f"dbot-ds: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
