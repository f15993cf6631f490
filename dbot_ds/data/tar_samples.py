"""Reading samples out of one shard (local path or `pipe:` URL) with webdataset's tar parsing."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from dbot_ds.data.shards import ShardError

END_OF_ARCHIVE = bytes(1024)  # a tar ends with two 512-byte zero blocks
# what a compressed tar (read by tarfile's "r|*", as webdataset does) starts with: its tail is
# the compressor's, and a cut one fails in the decompressor instead
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def compression_of(head: bytes) -> str | None:
    """gzip, bzip2 or xz when a file starting with `head` is compressed; None for a plain tar."""
    return next((kind for magic, kind in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)


def ends_whole(path: str | Path) -> bool:
    """Whether a local, uncompressed tar ends with its end-of-archive blocks: one cut at a
    member boundary (or inside a header) otherwise reads as a shorter, whole archive."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < len(END_OF_ARCHIVE):
            return False
        f.seek(-len(END_OF_ARCHIVE), os.SEEK_END)
        return f.read() == END_OF_ARCHIVE


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
    """A file object over a shard's stream that feeds every byte it reads to a hash (if given)
    and keeps the first bytes and the last 1024, so a tar cut at a member boundary (which parses
    without error) is told from a whole one."""

    def __init__(self, stream, digest=None, name: str = "shard"):
        self.stream, self.digest, self.name = stream, digest, name
        self.head, self.tail = b"", b""

    def __repr__(self) -> str:  # tar errors name their file object
        return self.name

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if self.digest is not None:
            self.digest.update(data)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = data[-1024:] if len(data) >= 1024 else (self.tail + data)[-1024:]
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def ended_whole(self) -> bool:
        """Whether what was read ends with the end-of-archive blocks (call after drain); a
        compressed tar's decompressor has checked its own end."""
        return compression_of(self.head) is not None or self.tail == END_OF_ARCHIVE

    def close(self) -> None:
        self.stream.close()


def iter_shard_samples(url: str, digest=None) -> Iterator[dict]:
    """Samples as dicts {'__key__', 'jpg', 'cls', 'json', ...} with raw bytes. A truncated or
    corrupt tar raises at the point where it breaks (after yielding what came before), also one
    cut exactly at a member boundary (no end-of-archive blocks: ShardError, after its last
    sample). With a `digest` (hashlib), every byte of a shard read to its end goes through it;
    a caller that stops early gets no hash (and pays no read of the rest)."""
    reader = HashingReader(wds.gopen(str(url)), digest, str(url))
    try:
        files = tar_file_iterator(reader)
        yield from group_by_keys(({**f, "__url__": str(url)} for f in files))
        reader.drain()  # tar padding and end-of-archive blocks
    except BaseException:
        # the read error is the news, not the close's; and a consumer that stopped (GeneratorExit)
        # may leave a pipe killed mid-stream that exits non-zero: no news either
        with contextlib.suppress(Exception):
            reader.close()
        raise
    reader.close()
    if not reader.ended_whole():
        raise ShardError(f"{url}: no end-of-archive blocks after its last sample (truncated?)")
