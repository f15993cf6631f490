"""Shard conversion, verification and inspection (`dbot-ds shards ...`, or `python -m data_tools`)."""
