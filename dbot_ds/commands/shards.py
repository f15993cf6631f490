"""`dbot-ds shards ...`: the shard tools (data/tools/), also `python -m data_tools ...`."""

from __future__ import annotations

from dbot_ds.data.tools.cli import add_commands


def register(sub) -> None:
    p = sub.add_parser("shards", help="WebDataset shards: convert, verify, inspect, index, digits, synthetic")
    add_commands(p.add_subparsers(dest="shards_command", required=True))
