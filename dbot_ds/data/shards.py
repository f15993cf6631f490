"""The shard format, one definition for the writer (data/tools) and the reader (the loader).

A sample is three tar members sharing a key: `<key>.jpg` (JPEG bytes), `<key>.cls` (the integer
label as text) and `<key>.json` (wnid, original file name, width, height): the layout of the
public timm/imagenet-1k-wds shards. A manifest (JSON) lists every shard with its sample count,
byte size and sha256, plus the class index, so the loader can account for an epoch exactly.
Shards are named by a path beside the manifest (in its folder or below), by URL (https://,
pipe:...), or by a name its `url_template` turns into a URL (e.g. "pipe:aws s3 cp
s3://bucket/{name} -"): object stores stream through webdataset's gopen like local files.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import webdataset as wds

from dbot_ds.errors import UserError
from dbot_ds.files import atomic_write, stays_inside

MANIFEST_FORMAT = "dbot-ds-shards/1"
IMAGE_KEY, LABEL_KEY, META_KEY = "jpg", "cls", "json"


class ShardError(UserError, RuntimeError):
    """A missing, corrupt or inconsistent shard set."""


def is_url(name: str) -> bool:
    """A shard named by URL (pipe:, https://, s3://, ...) rather than by a path beside its manifest."""
    return name.startswith("pipe:") or "://" in name


def sample_label(sample: dict) -> int:
    """The integer in a sample's .cls member; a ValueError saying what is wrong when it is
    missing or garbled (bad data to the loader, a bad shard to the shard tools)."""
    text = sample.get(LABEL_KEY)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"no label (.{LABEL_KEY})" if text is None else
                         f"label {text[:20]!r} is not an integer") from None


def fill_template(template: str, name: str) -> str:
    """A url_template filled with a shard's name ({name}: its only field)."""
    try:
        return template.format(name=name)
    except (AttributeError, KeyError, IndexError, ValueError) as e:
        raise ShardError(f"url_template {template!r} cannot be filled ({type(e).__name__}: {e}): its only "
                         "field is {name}; write a literal brace as {{ or }}") from e


def names_outside(folder: Path, names: list[str]) -> list[str]:
    """Shard names that would read outside `folder`: a path that is absolute or leaves it
    through '..' (lexically: a symlinked shard is fine), or a file:// URL (a local path by
    another name). Names a url_template fills are checked the same way."""
    return [n for n in names if n.startswith("file:") or (not is_url(n) and not stays_inside(n))]


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

    def url_of(self, name: str) -> str:
        """A shard's URL: its name if that is a URL, else the manifest's url_template filled with
        it, else the path beside the manifest."""
        if is_url(name):
            return name
        template = self.extra.get("url_template")
        return fill_template(template, name) if template else str(self.root / name)

    def urls(self, pipe_urls: bool = False) -> list[str]:
        """Every shard's URL. `pipe:` URLs run a shell command to fetch a shard: a manifest is
        data, so they are refused unless the user allows them (pipe_urls)."""
        urls = [self.url_of(s.name) for s in self.shards]
        piped = [u for u in urls if u.startswith("pipe:")]
        if piped and not pipe_urls:
            raise ShardError(f"the manifest in {self.root} fetches shards by running shell commands ({piped[0]}): "
                             "allow that only for a manifest you trust, with data.pipe_urls=true (the shard "
                             "tools: --pipe-urls)")
        return urls

    def to_json(self) -> dict:
        return {"format": MANIFEST_FORMAT, "total": self.total, "classes": self.classes,
                "shards": [dataclasses.asdict(s) for s in self.shards], **self.extra}


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read shard manifest {path}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = f"format {data.get('format')!r}" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ShardError(f"{path}: {found}, expected format {MANIFEST_FORMAT!r}; "
                         "make one with `dbot-ds shards index` or `dbot-ds shards convert`")
    try:
        shards, classes = [ShardInfo(**s) for s in data["shards"]], list(data["classes"])
        if not all(isinstance(s.name, str) for s in shards):
            raise TypeError("a shard's name is not a string")
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: not a valid manifest ({type(e).__name__}: {e}); remake it with "
                         "`dbot-ds shards index` or `dbot-ds shards convert`") from e
    if "url_template" in data:
        fill_template(data["url_template"], "x")  # a bad template is reported here, once
    outside = names_outside(path.parent, [s.name for s in shards])
    if outside:
        raise ShardError(f"{path} names shards outside its own folder ({', '.join(outside[:3])}): a manifest "
                         "lists shards in its folder or below; move it there and re-index")
    extra = {k: v for k, v in data.items() if k not in ("format", "total", "classes", "shards")}
    return Manifest(shards, classes, extra, path.parent)


def write_manifest(manifest: Manifest, path: str | Path) -> None:
    atomic_write(Path(path), (json.dumps(manifest.to_json(), indent=1) + "\n").encode())


def sample_record(key: str, jpeg: bytes, label: int, meta: dict) -> dict:
    """One sample as webdataset's writer takes it: {"__key__", "jpg", "cls", "json"} as bytes."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} may contain neither '.' nor '/'")
    return {"__key__": key, IMAGE_KEY: jpeg, LABEL_KEY: str(label).encode(),
            META_KEY: json.dumps(meta, sort_keys=True).encode()}


def shard_writer(path: str | Path) -> wds.TarWriter:
    """webdataset's TarWriter with every member's metadata fixed (mtime 0, no owner names, 0644,
    ustar): the same samples always give the same bytes, so a resumed conversion reproduces an
    uninterrupted one exactly."""
    return wds.TarWriter(str(path), user="", group="", mode=0o644, mtime=0, encoder=False,
                         format=tarfile.USTAR_FORMAT)
