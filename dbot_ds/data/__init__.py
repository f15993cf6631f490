"""Data: the shard format, epoch plans, streams, transforms and the loader that hands the
training loop device-ready batches; tools/ converts, verifies and indexes shard sets."""
