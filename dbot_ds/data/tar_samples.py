"""Reading samples out of one shard (local path or `pipe:` URL) with webdataset's tar parsing."""

from __future__ import annotations

import hashlib
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator


class Checksum:
    """The sha256 and byte count of a stream, fed as it is read."""

    def __init__(self):
        self.sha, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


class HashingReader:
    """A file object that feeds every byte it reads to a hash."""

    def __init__(self, stream, digest):
        self.stream, self.digest = stream, digest

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.stream.close()


def iter_shard_samples(url: str, digest=None) -> Iterator[dict]:
    """Samples as dicts {'__key__', 'jpg', 'cls', 'json', ...} with raw bytes. A truncated or
    corrupt tar raises at the point where it breaks (after yielding what came before). With a
    `digest` (hashlib), every byte of the shard goes through it, also those after the last
    sample read (when the caller stops early, at close): one read, hashed as it streams."""
    stream = wds.gopen(str(url))
    if digest is not None:
        stream = HashingReader(stream, digest)
    try:
        files = tar_file_iterator(stream)
        for sample in group_by_keys(({**f, "__url__": str(url)} for f in files)):
            yield sample
        if digest is not None:
            stream.drain()  # tar padding and end-of-archive blocks
    except GeneratorExit:
        if digest is not None:
            stream.drain()
        raise
    finally:
        stream.close()
