"""Reading samples out of one shard (local path or `pipe:` URL) with webdataset's tar parsing."""

from __future__ import annotations

from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator


def iter_shard_samples(url: str) -> Iterator[dict]:
    """Samples as dicts {'__key__', 'jpg', 'cls', 'json', ...} with raw bytes. A truncated or
    corrupt tar raises at the point where it breaks (after yielding what came before)."""
    stream = wds.gopen(str(url))
    try:
        files = tar_file_iterator(stream)
        for sample in group_by_keys(({**f, "__url__": str(url)} for f in files)):
            yield sample
    finally:
        stream.close()
