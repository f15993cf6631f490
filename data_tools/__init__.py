"""`python -m data_tools ...`, kept working: the shard tools now live in dbot_ds/data/tools
(`dbot-ds shards ...` is the same command)."""
