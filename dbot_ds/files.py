"""Writing finished work so that a crash never leaves a half-written file under its real name."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def shipped(relative: str) -> Path:
    """A file shipped beside the package (ds_configs/, slurm/): in the checkout for an editable
    install, under <prefix>/share/dbot-ds for a regular one."""
    checkout = Path(__file__).resolve().parent.parent / relative
    return checkout if checkout.exists() else Path(sys.prefix) / "share" / "dbot-ds" / relative


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write to a temporary sibling, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stays_inside(name: str) -> bool:
    """A relative name that stays inside the folder it is relative to: no absolute path, no way out through '..'.
    Lexical, so symlinks are followed wherever they lead: a folder of symlinked shards (common
    on clusters) or weights linked from a cache (Hugging Face, git-annex) are inside."""
    normal = os.path.normpath(name)
    return bool(name) and not os.path.isabs(name) and normal != os.pardir and \
        not normal.startswith(os.pardir + os.sep)
