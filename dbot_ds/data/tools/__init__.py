"""Shard tools: convert image sets into WebDataset shards, verify, inspect and index them
(`dbot-ds shards ...`, or `python -m data_tools ...`)."""
