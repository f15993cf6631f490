"""The shard format, one definition for the writer (data/tools) and the reader (the loader).

A sample is three tar members sharing a key: `<key>.jpg` (JPEG bytes), `<key>.cls` (the integer
label as text) and `<key>.json` (wnid, original file name, width, height): the layout of the
public timm/imagenet-1k-wds shards. A manifest (JSON) lists every shard with its sample count,
byte size and sha256, plus the class index, so the loader can account for an epoch exactly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

from dbot_ds.errors import UserError
from dbot_ds.files import atomic_write, stays_inside

MANIFEST_FORMAT = "dbot-ds-shards/1"
IMAGE_KEY, LABEL_KEY, META_KEY = "jpg", "cls", "json"


class ShardError(UserError, RuntimeError):
    """A missing, corrupt or inconsistent shard set."""


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str      # path relative to the manifest's directory
    samples: int
    bytes: int
    sha256: str


@dataclasses.dataclass
class Manifest:
    shards: list[ShardInfo]
    classes: list[str]  # wnid of label i
    extra: dict = dataclasses.field(default_factory=dict)  # conversion report and options
    root: Path = Path(".")

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    def urls(self) -> list[str]:
        return [str(self.root / s.name) for s in self.shards]

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "total": self.total, "classes": self.classes,
                "shards": [dataclasses.asdict(s) for s in self.shards], **self.extra}


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read shard manifest {path}: {e}") from e
    if data.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
                         "make one with `dbot-ds shards index` or `dbot-ds shards convert`")
    try:
        shards, classes = [ShardInfo(**s) for s in data["shards"]], list(data["classes"])
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: not a valid manifest ({type(e).__name__}: {e}); remake it with "
                         "`dbot-ds shards index` or `dbot-ds shards convert`") from e
    outside = [s.name for s in shards if not stays_inside(path.parent, s.name)]
    if outside:
        raise ShardError(f"{path} names shards outside its own folder ({', '.join(outside[:3])}): a manifest "
                         "lists shards in its folder or below; move it there and re-index")
    extra = {k: v for k, v in data.items() if k not in ("format", "total", "classes", "shards")}
    return Manifest(shards, classes, extra, path.parent)


def write_manifest(manifest: Manifest, path: str | Path) -> None:
    atomic_write(Path(path), (json.dumps(manifest.to_json(), indent=1) + "\n").encode())


def sample_members(key: str, jpeg: bytes, label: int, meta: dict) -> list[tuple[str, bytes]]:
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} may contain neither '.' nor '/'")
    return [(f"{key}.{IMAGE_KEY}", jpeg), (f"{key}.{LABEL_KEY}", str(label).encode()),
            (f"{key}.{META_KEY}", json.dumps(meta, sort_keys=True).encode())]


class DeterministicTarWriter:
    """Writes members with fixed metadata (mtime 0, root, 0644): the same samples always give
    the same bytes, so a resumed conversion reproduces an uninterrupted one exactly."""

    def __init__(self, path: Path):
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()
