"""data_tools: converting image sets into shards, resuming, verifying."""

import io
import json

import pytest
from helpers import ilsvrc_tar_of_tars, jpeg, mini_imagenet
from PIL import Image

from dbot_ds.data.tools import sources
from dbot_ds.data.tools.cli import main as shards_main
from dbot_ds.data.tools.convert import convert
from dbot_ds.data.tools.verify import inspect, verify
from dbot_ds.data.shards import ShardError, read_manifest
from dbot_ds.data.tar_samples import iter_shard_samples


def all_samples(manifest):
    return [s for url in manifest.urls() for s in iter_shard_samples(url)]


@pytest.fixture
def tree(tmp_path):
    odd = mini_imagenet(tmp_path / "train")
    return tmp_path / "train", odd


def test_imagefolder_conversion_counts_labels_manifest_and_reencode_report(tree, tmp_path):
    root, odd = tree
    items, classes = sources.imagefolder(root)
    m = convert(items, classes, tmp_path / "shards", shard_size=4, progress=False)
    report = m.extra["report"]
    assert m.total == 3 * 5 + 3 == report["samples"]  # the unreadable file is left out
    assert report["reencoded"] == {"jpeg-cmyk": 1, "jpeg-l": 1, "png-rgb": 1}
    assert report["unreadable"] == 1 and report["errors"][0]["path"] == str(odd["broken"])
    assert len(m.shards) == 5 and sorted(s.samples for s in m.shards) == [3, 3, 4, 4, 4]  # 19 inputs
    on_disk = read_manifest(tmp_path / "shards" / "manifest.json")
    assert on_disk.classes == classes and on_disk.shards == m.shards
    for s in all_samples(m):
        meta = json.loads(s["json"])
        assert int(s["cls"]) == classes.index(meta["wnid"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (meta["width"], meta["height"])
        source = root / meta["wnid"] / meta["filename"]
        if "_" in meta["filename"] and meta["filename"].split("_")[1][0].isdigit():
            assert s["jpg"] == source.read_bytes()  # RGB JPEGs are copied, not re-encoded


def test_tar_of_tars_gives_the_same_shards_as_the_extracted_tree(tree, tmp_path):
    root, odd = tree
    odd["broken"].unlink()
    tar = ilsvrc_tar_of_tars(root, tmp_path / "ILSVRC2012_img_train.tar")
    a = convert(*sources.imagefolder(root), tmp_path / "a", shard_size=5, progress=False)
    b = convert(*sources.ilsvrc_train_tar(tar), tmp_path / "b", shard_size=5, progress=False)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.classes == b.classes == sorted(p.name for p in root.iterdir())


def test_validation_images_take_labels_from_loc_csv_or_the_devkit(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np

    val = tmp_path / "val"
    val.mkdir()
    wnids = ["n01440764", "n01443537", "n01443537", "n01440764"]
    for i in range(4):
        (val / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(jpeg(i))
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4\n" for i, w in enumerate(wnids)))
    devkit = tmp_path / "devkit" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{1 if w == 'n01440764' else 2}\n" for w in wnids))
    synsets = np.array([(1, "n01440764"), (2, "n01443537")],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    scipy_io.savemat(str(devkit / "meta.mat"), {"synsets": synsets})
    for labels in (csv, tmp_path / "devkit"):
        items, classes = sources.val_folder(val, labels)
        assert classes == ["n01440764", "n01443537"]
        assert [it.label for it in sorted(items, key=lambda it: it.key)] == [0, 1, 1, 0]


def test_an_interrupted_conversion_resumes_to_the_same_shards(tree, tmp_path):
    root, _ = tree
    items, classes = sources.imagefolder(root)
    straight = convert(items, classes, tmp_path / "straight", shard_size=3, progress=False)
    out = tmp_path / "resumed"
    assert convert(items, classes, out, shard_size=3, progress=False, max_shards=2) is None
    assert not (out / "manifest.json").exists()  # no reader can take an unfinished set
    (out / ".train-000004.tar.partial").write_bytes(b"half a shard")  # killed mid-write
    resumed = convert(items, classes, out, shard_size=3, progress=False, workers=2)
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in straight.shards]
    assert not list(out.glob(".*.partial"))


def test_a_directory_of_another_conversion_is_refused(tree, tmp_path):
    items, classes = sources.imagefolder(tree[0])
    convert(items, classes, tmp_path / "s", shard_size=3, progress=False)
    with pytest.raises(ShardError, match="other inputs or options"):
        convert(items, classes, tmp_path / "s", shard_size=4, progress=False)


def test_resize_short_side_writes_smaller_images(tree, tmp_path):
    items, classes = sources.imagefolder(tree[0])
    m = convert(items, classes, tmp_path / "small", shard_size=50, resize_short_side=20, progress=False)
    for s in all_samples(m):
        assert min(Image.open(io.BytesIO(s["jpg"])).size) == 20


def test_verify_passes_then_finds_a_damaged_shard(tree, tmp_path):
    items, classes = sources.imagefolder(tree[0])
    convert(items, classes, tmp_path / "s", shard_size=6, progress=False)
    manifest = tmp_path / "s" / "manifest.json"
    assert verify(manifest, progress=False) == []
    shard = tmp_path / "s" / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    problems = verify(manifest, progress=False)
    assert any("train-000001.tar: sha256 or size does not match" in p for p in problems)
    assert shards_main(["verify", str(manifest)]) == 1


def test_inspect_shows_samples_and_the_class_histogram(tree, tmp_path):
    items, classes = sources.imagefolder(tree[0])
    convert(items, classes, tmp_path / "s", shard_size=6, progress=False)
    text = inspect(tmp_path / "s" / "manifest.json", n=2)
    assert "4 shards, 18 samples, 3 classes" in text  # 19 inputs, one unreadable
    assert "0: n01440764 6" in text and "2: n02102040 6" in text


def test_cli_convert_from_the_tar(tree, tmp_path, capsys):
    root, odd = tree
    tar = ilsvrc_tar_of_tars(root, tmp_path / "train.tar")
    assert shards_main(["convert", "--ilsvrc-tar", str(tar), "--out", str(tmp_path / "s"),
                        "--shard-bytes", "20kb", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "18 samples, 3 classes" in out and "unreadable: 1" in out and "n02102040_broken" in out


def test_synthetic_imagenet_like_shards_are_reproducible_whatever_the_worker_count(tmp_path):
    """`dbot-ds shards synthetic`: end-to-end benchmark data without ImageNet."""
    for workers in ("1", "2"):
        assert shards_main(["synthetic", "--out", str(tmp_path / workers), "--images", "24",
                            "--shard-size", "10", "--workers", workers]) == 0
    one, two = (read_manifest(tmp_path / w / "manifest.json") for w in ("1", "2"))
    assert one.total == 24 and len(one.shards) == 3 and verify(tmp_path / "1" / "manifest.json") == []
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    sample = next(iter_shard_samples(str(tmp_path / "1" / one.shards[0].name)))
    assert Image.open(io.BytesIO(sample["jpg"])).size == (500, 375) and len(sample["jpg"]) > 30_000


def test_a_tar_of_tars_with_a_class_twice_or_a_compressed_class_tar_is_refused_by_name(tree, tmp_path):
    import io
    import subprocess
    import sys
    import tarfile

    from helpers import subprocess_env

    root, _ = tree
    tar = ilsvrc_tar_of_tars(root, tmp_path / "train.tar")
    with tarfile.open(tar, "a") as outer:  # the first class again, under a directory
        first = sorted(p for p in root.iterdir() if p.is_dir())[0].name
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w"):
            pass
        info = tarfile.TarInfo(f"again/{first}.tar")
        info.size = len(inner.getvalue())
        outer.addfile(info, io.BytesIO(inner.getvalue()))
    with pytest.raises(sources.SourceError, match=f"two class tars for {first}: {first}.tar and again/{first}.tar"):
        sources.ilsvrc_train_tar(tar)

    gz = tmp_path / "gz.tar"
    with tarfile.open(gz, "w") as outer:
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w:gz") as t:
            data = jpeg(1)
            member = tarfile.TarInfo("a.JPEG")
            member.size = len(data)
            t.addfile(member, io.BytesIO(data))
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(inner.getvalue())
        outer.addfile(info, io.BytesIO(inner.getvalue()))
    r = subprocess.run([sys.executable, "-m", "data_tools", "convert", "--ilsvrc-tar", str(gz), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("python -m data_tools: error: ") and "n01440764.tar is not an uncompressed tar" in r.stderr
