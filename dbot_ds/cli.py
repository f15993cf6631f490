"""`dbot-ds <command>`: pretrain, finetune, probe, analyze, export, slurm, shards, bench,
bench-data, recipes (`dbot-ds <command> --help`). Bad input ends in one line on stderr and exit
status 2, before any expensive work (errors.py)."""

from __future__ import annotations

import argparse
import sys

from dbot_ds.commands import register_all
from dbot_ds.errors import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbot-ds", description=__doc__)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK is in the env too.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    register_all(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args, "dbot-ds")


if __name__ == "__main__":
    sys.exit(main())
