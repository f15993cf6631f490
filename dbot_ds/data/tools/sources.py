"""Where images come from: an ImageFolder tree, ImageNet validation images with their labels,
or the original ILSVRC2012 train tar (a tar of per-class tars), read in place."""

from __future__ import annotations

import csv
import dataclasses
import re
import sys
import tarfile
from pathlib import Path

from dbot_ds.data.tar_samples import compression_of, ends_whole
from dbot_ds.errors import UserError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class SourceError(UserError, ValueError):
    """An image source that cannot be read as given."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One source image: `path`, or `size` bytes at `offset` inside the tar `path`."""

    key: str
    label: int
    wnid: str
    filename: str
    path: str
    size: int
    offset: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


def sample_key(filename: str) -> str:
    """File stem with characters webdataset would split on replaced (n01440764_10026)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(filename).stem)


def _unique(items: list[Item]) -> list[Item]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        n = seen.get(it.key, 0)
        seen[it.key] = n + 1
        out.append(it if n == 0 else dataclasses.replace(it, key=f"{it.key}_{n}"))
    return out


def imagefolder(root: str | Path) -> tuple[list[Item], list[str]]:
    """root/<wnid>/<image>: labels are the sorted class directories' indices."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected <root>/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class directories (expected <root>/<class>/<image>)")
    items = []
    for label, wnid in enumerate(classes):
        for f in sorted((root / wnid).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                items.append(Item(sample_key(f.name), label, wnid, f.name, str(f), f.stat().st_size))
    return _unique(items), classes


def read_val_labels(labels: str | Path, image_names: list[str]) -> dict[str, str]:
    """image stem -> wnid, from LOC_val_solution.csv or an ILSVRC2012 devkit directory."""
    labels = Path(labels)
    if labels.is_file() and labels.suffix == ".csv":
        with open(labels, newline="") as f:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    truth = labels / "data" / "ILSVRC2012_validation_ground_truth.txt"
    meta = labels / "data" / "meta.mat"
    if not (truth.is_file() and meta.is_file()):
        raise FileNotFoundError(f"{labels}: expected LOC_val_solution.csv or a devkit directory with "
                                "data/ILSVRC2012_validation_ground_truth.txt and data/meta.mat")
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise SourceError("reading the devkit's meta.mat needs scipy (pip install scipy), "
                          "or pass LOC_val_solution.csv instead") from e
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    ids = [int(x) for x in truth.read_text().split()]
    stems = sorted(Path(n).stem for n in image_names)  # ground truth follows val_00000001...
    if len(ids) != len(stems):
        raise SourceError(f"{truth} has {len(ids)} labels for {len(stems)} images")
    return {stem: id_to_wnid[i] for stem, i in zip(stems, ids)}


def val_folder(images: str | Path, labels: str | Path,
               classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Flat validation images; classes: the train set's class list (default: sorted wnids)."""
    images = Path(images)
    files = sorted(f for f in images.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    wnid_of = read_val_labels(labels, [f.name for f in files])
    classes = classes or sorted(set(wnid_of.values()))
    index = {w: i for i, w in enumerate(classes)}
    items = []
    for f in files:
        wnid = wnid_of.get(f.stem)
        if wnid is None or wnid not in index:
            raise SourceError(f"{f.name}: no label in {labels}" if wnid is None else
                              f"{f.name}: class {wnid} is not in the class list")
        items.append(Item(sample_key(f.name), index[wnid], wnid, f.name, str(f), f.stat().st_size))
    return _unique(items), classes


ILSVRC_CLASSES = 1000
COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def ilsvrc_train_tar(path: str | Path) -> tuple[list[Item], list[str]]:
    """ILSVRC2012_img_train.tar: <wnid>.tar members, each a tar of JPEGs. Nothing is
    extracted: headers are read in place and every image is addressed by (offset, size)."""
    path = Path(path)
    try:
        outer = tarfile.open(path, "r:")
    except tarfile.ReadError as e:
        raise SourceError(f"{path} is not an uncompressed tar ({e}): expected ILSVRC2012_img_train.tar") from e
    with outer:
        try:
            items_by_class = class_tars(path, outer)
        except (tarfile.TarError, EOFError) as e:  # the outer tar's own headers or data break off
            raise SourceError(f"{path} is truncated or unreadable ({type(e).__name__}: {e}): "
                              "fetch ILSVRC2012_img_train.tar again") from e
    if not ends_whole(path):  # cut inside a header, or at a member boundary: tarfile just stops there
        raise SourceError(f"{path} is truncated (no end-of-archive blocks): fetch ILSVRC2012_img_train.tar again")
    if not items_by_class:
        raise SourceError(f"{path} holds no per-class .tar members: not an ILSVRC2012 train tar")
    if len(items_by_class) != ILSVRC_CLASSES:  # converts, but is likely a partial copy
        print(f"warning: {path} holds {len(items_by_class)} class tars, ILSVRC2012 has {ILSVRC_CLASSES}: "
              "converting the classes found", file=sys.stderr)
    classes = sorted(items_by_class)
    items = [Item(sample_key(name), label, wnid, Path(name).name, str(path), size, offset)
             for label, wnid in enumerate(classes) for name, offset, size in sorted(items_by_class[wnid])]
    return _unique(items), classes


def class_tars(path: Path, outer: tarfile.TarFile) -> dict[str, list[tuple[str, int, int]]]:
    """wnid -> its images (name, offset in the outer tar, size), from the outer tar's class tars."""
    items_by_class: dict[str, list[tuple[str, int, int]]] = {}
    tar_of: dict[str, str] = {}  # wnid -> the inner tar it came from
    compressed = []
    for member in outer:
        if member.isreg() and member.name.endswith(COMPRESSED_TAR):
            compressed.append(member.name)  # reported together once the outer tar is read
            continue
        if not (member.isreg() and member.name.endswith(".tar")):
            continue
        wnid = Path(member.name).stem
        if wnid in tar_of:
            raise SourceError(f"{path}: two class tars for {wnid}: {tar_of[wnid]} and {member.name}; "
                              "each class must come once")
        tar_of[wnid] = member.name
        items_by_class[wnid] = class_images(path, outer, member)
    if compressed:
        raise SourceError(f"{path}: {len(compressed)} compressed class tar(s) ({', '.join(compressed[:3])}"
                          f"{', ...' if len(compressed) > 3 else ''}): images are read in place, so each class "
                          "tar must be a plain .tar: decompress them first")
    return items_by_class


def class_images(path: Path, outer: tarfile.TarFile, member: tarfile.TarInfo) -> list[tuple[str, int, int]]:
    """One class tar's images as (name, offset in the outer tar, size)."""
    try:
        with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
            return [(m.name, member.offset_data + m.offset_data, m.size) for m in inner if m.isreg()]
    except (tarfile.TarError, EOFError) as e:
        raise SourceError(f"{path}: {member.name} {why_unreadable(path, outer, member)} ({type(e).__name__}: "
                          f"{e}); its images are read in place, so each class tar must be a whole plain tar") from e


def why_unreadable(path: Path, outer: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """Why a class tar does not open: compressed, cut off by the end of the file, or broken."""
    if member.offset_data + member.size > path.stat().st_size:
        return "is truncated (the file ends inside it)"
    head = outer.extractfile(member).read(6)
    compression = compression_of(head)
    if compression:
        return f"is not an uncompressed tar (it is {compression}-compressed)"
    return "is unreadable (not a tar, or damaged)"
