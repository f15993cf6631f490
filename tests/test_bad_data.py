"""Bad and hostile data: a lost sample keeps its position (so every resume reads each good
sample once), verify=sha256 trains on nothing unverified, leaving a shard early is no bad shard,
symlinked sets are inside their folder, bad input ends in one line, and a tar cut at a member
boundary is caught. All on real shards from the repo's writers."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from helpers import ilsvrc_tar_of_tars, mini_imagenet, read_epoch, read_flat, stream, subprocess_env, write_shards

from dbot_ds.data.epoch_plan import Layout
from dbot_ds.data.shard_loader import LOST, BadCounter, Piece, ShardStream
from dbot_ds.data.shards import ShardError, read_manifest
from dbot_ds.data.tar_samples import Checksum, iter_shard_samples
from dbot_ds.data.tools import sources
from dbot_ds.data.tools.verify import index, inspect, verify
from dbot_ds.data.transforms import UnreadableImage
from dbot_ds.files import stays_inside


def grow(shard, extra=512):
    shard.write_bytes(shard.read_bytes() + bytes(extra))  # its size no longer the manifest's


def cut_at_member_boundary(shard, sample: int):
    """Cut a shard just before sample `sample`'s first member header: a valid-looking tar."""
    with tarfile.open(shard) as t:
        offset = next(m.offset for m in t.getmembers() if m.name.startswith(f"s{sample:05d}."))
    shard.write_bytes(shard.read_bytes()[:offset])


def cli(*args, module="dbot_ds.cli"):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=subprocess_env())


def assert_one_line_error(r, *parts):
    """Exit status 2, no traceback, and the error as the last line of stderr (after any progress bar)."""
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("dbot-ds: error: ") and all(p in line for p in parts), line


# ---------------------------------------------------------------- 1. verify=sha256 holds a piece

def test_with_verify_sha256_nothing_of_a_changed_shard_is_trained_on_and_it_counts_once(tmp_path, caplog):
    manifest = write_shards(tmp_path, [10, 10, 12])
    shard = tmp_path / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # same size: only the hash tells
    shard.write_bytes(bytes(data))
    got = {i for b in read_epoch(stream(manifest, micro=4, max_bad_fraction=0.5, verify="sha256"), 0, workers=0)
           for i in b}
    assert not got & set(range(20, 32)) and got == set(range(20))
    bad = [r.getMessage() for r in caplog.records if "bad sample" in r.getMessage()]
    assert len(bad) == 1 and "skipped 12 bad sample(s) (12 so far)" in bad[0] and "sha256 differs" in bad[0]


def test_with_verify_sha256_shards_split_between_ranks_still_verify(tmp_path, caplog):
    """A piece that stops before its shard's end still hashes the whole shard."""
    manifest = write_shards(tmp_path, [7, 13, 1, 11, 16])
    ranks = [stream(manifest, rank=r, world=2, micro=4, accum=2, verify="sha256") for r in (0, 1)]
    seen = [i for ds in ranks for b in read_epoch(ds, 0) for i in b]
    assert sorted(seen) == list(range(48)) and "bad sample" not in caplog.text


# ---------------------------------------------------------------- 2. lost samples keep their positions

@pytest.mark.parametrize("before,after", [((1, 1), (2, 1)), ((2, 2), (1, 2))], ids=["1rank-to-2", "2ranks-to-1"])
def test_a_shard_of_the_wrong_size_keeps_its_positions_so_a_resume_in_another_layout_reads_each_good_sample_once(
        tmp_path, before, after):
    manifest = write_shards(tmp_path, [30] * 16)  # 480 samples, global batch 24: 20 steps
    grow(tmp_path / "train-000003.tar")
    good = set(range(480)) - set(range(90, 120))
    (w0, k0), (w1, k1) = before, after

    def rank(r, world):
        return stream(manifest, rank=r, world=world, micro=2, accum=12 // world, max_bad_fraction=1.0)
    first = [i for r in range(w0) for i in read_flat(rank(r, w0), 0, workers=k0)[: 10 * 24 // w0]]
    rest = [i for r in range(w1) for i in read_flat(rank(r, w1), 0, 10, (Layout(w0, k0, 10),), workers=k1)]
    assert len(first) + len(rest) == 480  # a stand-in for every lost sample
    assert not set(first) & set(rest) and set(first) | set(rest) == good  # stand-ins repeat a good one of their own run


def test_a_bad_first_sample_keeps_the_raw_positions_a_resume_skips_by(tmp_path):
    """The first samples of the stream are corrupt: the slot is owed, not given to the next raw sample."""
    manifest = write_shards(tmp_path, [8, 8], corrupt={0, 1})
    for epoch in range(3):
        full = read_epoch(stream(manifest, micro=4, max_bad_fraction=0.9), epoch, workers=0)
        resumed = read_epoch(stream(manifest, micro=4, max_bad_fraction=0.9), epoch, workers=0, step=1)
        before, after = {i for b in full[:1] for i in b}, {i for b in resumed for i in b}
        assert len(resumed) == 3 and not before & after and before | after == set(range(2, 16)), epoch


def test_the_raw_stream_gives_a_lost_placeholder_for_every_unreadable_position(tmp_path):
    manifest = write_shards(tmp_path, [10, 10], truncate=1)  # shard 1 breaks after a few samples
    ds = stream(manifest, max_bad_fraction=1.0)
    bad = BadCounter(20, 1.0, "test")
    raw = list(ds.raw_samples(0, 0, [Piece(str(tmp_path / f"train-00000{s}.tar"), 0, 10) for s in (0, 1)], 20, bad))
    assert len(raw) == 20 and raw[:10].count(LOST) == 0 and raw.count(LOST) == bad.count > 0


# ---------------------------------------------------------------- 3. resampled mode after earlier layouts

def test_resampled_mode_after_earlier_layouts_yields_what_len_says(tmp_path):
    manifest = write_shards(tmp_path, [40, 40])
    ds = ShardStream(manifest=read_manifest(manifest), epoch_samples=80, rank=0, world=1, micro=2, accum=2,
                     seed=0, crop=16, scale=(0.5, 1.0), hflip=False, shuffle_buffer=8)
    got = read_flat(ds, 1, 12, (Layout(2, 1, 8),), workers=1)  # 20 steps of 4: 8 on two ranks, 4 here, 8 to go
    assert len(got) == len(ds) == (20 - 12) * 4


# ---------------------------------------------------------------- 4. stopping early

def test_leaving_a_piped_shard_early_is_no_bad_shard(tmp_path, caplog):
    """A fetch command that exits non-zero when its reader goes away (as `aws s3 cp - ` does)."""
    manifest = write_shards(tmp_path, [10, 10, 12])
    data = json.loads(manifest.read_text())
    # SIGPIPE ignored and bytes still to write when the reader leaves: the command exits 1 then
    data["url_template"] = f"pipe:trap '' PIPE; cat {tmp_path}/{{name}}; head -c 300000 /dev/zero 2>/dev/null"
    (tmp_path / "piped.json").write_text(json.dumps(data))
    ds = stream(tmp_path / "piped.json", max_bad_fraction=1.0, pipe_urls=True)
    bad = BadCounter(32, 1.0, "test")
    raw = ds.raw_samples(0, 0, [Piece(u, 0, n) for u, n in ds.epoch_shards(0)], 32, bad)
    assert all(next(raw) is not LOST for _ in range(3))
    raw.close()
    assert bad.count == 0 and "bad sample" not in caplog.text


def test_a_consumer_that_stops_early_reads_no_more_of_the_shard(tmp_path):
    write_shards(tmp_path, [30])
    checksum, shard = Checksum(), tmp_path / "train-000000.tar"
    samples = iter_shard_samples(str(shard), checksum)
    next(samples)
    samples.close()
    assert checksum.size < shard.stat().st_size / 2  # no drain of the rest: nobody needs its hash


def test_a_tar_error_names_the_shard(tmp_path):
    write_shards(tmp_path, [10])
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard) as t:
        member = t.getmembers()[4]
    shard.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])  # inside its data
    with pytest.raises(tarfile.ReadError, match="unexpected end of data @ .*train-000000.tar"):
        list(iter_shard_samples(str(shard), Checksum()))


# ---------------------------------------------------------------- 5. lexical "inside"

def test_a_folder_of_symlinked_shards_is_inside_and_indexes(tmp_path):
    write_shards(tmp_path / "store", [6, 6])
    (tmp_path / "set").mkdir()
    for p in sorted((tmp_path / "store").glob("*.tar")):
        os.symlink(p, tmp_path / "set" / p.name)
    m = index(sorted(str(p) for p in (tmp_path / "set").glob("*.tar")), tmp_path / "set" / "manifest.json")
    assert [s.name for s in m.shards] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(i for b in read_epoch(stream(tmp_path / "set" / "manifest.json", micro=4), 0) for i in b) == \
        list(range(12))


def test_inside_is_lexical_and_refuses_absolute_names_dot_dot_and_file_urls(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "blob").write_bytes(b"w")
    (tmp_path / "export").mkdir()
    os.symlink(tmp_path / "cache" / "blob", tmp_path / "export" / "model.safetensors")  # HF cache, git-annex
    assert stays_inside("model.safetensors") and stays_inside("a/../b")
    assert not any(stays_inside(n) for n in ("../cache/blob", "a/../../b", "/abs", "..", ""))
    manifest = write_shards(tmp_path / "set", [4])
    data = json.loads(manifest.read_text())
    for name, template in [("file:///etc/passwd", None), ("../x.tar", "pipe:cat /data/{name}")]:
        data["shards"][0]["name"] = name
        data.pop("url_template", None)
        data.update({"url_template": template} if template else {})
        manifest.write_text(json.dumps(data))
        with pytest.raises(ShardError, match="outside its own folder"):
            read_manifest(manifest)


# ---------------------------------------------------------------- 6. one-line errors

def test_a_manifest_with_an_unknown_template_field_or_a_json_list_is_one_line(tmp_path):
    manifest = write_shards(tmp_path, [4])
    data = json.loads(manifest.read_text())
    data["url_template"] = "pipe:cat /data/{shard}"
    manifest.write_text(json.dumps(data))
    assert_one_line_error(cli("shards", "inspect", str(manifest)), "url_template", "its only field is {name}")
    manifest.write_text("[1, 2]")
    assert_one_line_error(cli("shards", "verify", str(manifest)), "a JSON list", "dbot-ds shards index")


def test_shards_index_of_a_truncated_shard_is_one_line(tmp_path):
    write_shards(tmp_path, [10], truncate=0)
    assert_one_line_error(cli("shards", "index", str(tmp_path / "train-000000.tar"), "--out",
                              str(tmp_path / "m.json")), "train-000000.tar: ", "truncated")


@pytest.mark.parametrize("label", [None, b"seven"], ids=["missing", "garbled"])
def test_index_and_inspect_name_a_sample_without_an_integer_label(tmp_path, label):
    import webdataset as wds

    from helpers import solid_jpeg
    with wds.TarWriter(str(tmp_path / "a.tar")) as w:
        w.write({"__key__": "k0", "jpg": solid_jpeg(0), "cls": b"1"})
        w.write({"__key__": "k1", "jpg": solid_jpeg(1), **({"cls": label} if label else {})})
    with pytest.raises(ShardError, match="a.tar:k1: " + ("no label" if label is None else "label b'seven' is not")):
        index([str(tmp_path / "a.tar")], tmp_path / "m.json")
    write_shards(tmp_path / "set", [2])
    shard = tmp_path / "set" / "train-000000.tar"
    m = index([str(shard)], tmp_path / "set" / "manifest.json")
    with wds.TarWriter(str(shard)) as w:  # the same name, now with the bad label
        w.write({"__key__": "k1", "jpg": solid_jpeg(1), **({"cls": label} if label else {})})
    with pytest.raises(ShardError, match="k1: "):
        inspect(tmp_path / "set" / "manifest.json")
    assert any("k1" in p for p in verify(tmp_path / "set" / "manifest.json", progress=False)) and m.total == 2


def test_fine_tuning_counts_a_missing_or_garbled_label_as_a_bad_sample():
    import random

    from helpers import solid_jpeg

    from dbot_ds.data.transforms import ClassifySample
    classify = ClassifySample(16, "rand-m9-mstd0.5-inc1", 0.25, "pixel")
    assert classify({"jpg": solid_jpeg(3), "cls": b"2"}, random.Random(0))[1] == 2
    for sample in ({"jpg": solid_jpeg(3)}, {"jpg": solid_jpeg(3), "cls": b"x2"}):
        with pytest.raises(UnreadableImage, match="label"):
            classify(sample, random.Random(0))


def test_a_truncated_ilsvrc_tar_is_one_source_error_at_every_cut(tmp_path):
    root = tmp_path / "tree"
    mini_imagenet(root)
    whole = ilsvrc_tar_of_tars(root, tmp_path / "train.tar")
    with tarfile.open(whole) as t:
        data_end = max(m.offset_data + m.size for m in t.getmembers())
    whole = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    for end in range(256, data_end, 700):  # every cut before the last class tar's last byte
        cut.write_bytes(whole[:end])
        with pytest.raises(sources.SourceError, match="truncated"):  # not tarfile's traceback, nor a silent class less
            sources.ilsvrc_train_tar(cut)


# ---------------------------------------------------------------- 7. silent partial data

def test_a_shard_cut_at_a_member_boundary_is_caught_by_index_and_verify(tmp_path):
    manifest = write_shards(tmp_path, [6, 6])
    cut_at_member_boundary(tmp_path / "train-000001.tar", 9)
    with pytest.raises(ShardError, match="no end-of-archive blocks"):
        index([str(p) for p in sorted(tmp_path.glob("*.tar"))], tmp_path / "again.json")
    data = json.loads(manifest.read_text())  # a manifest made of the cut shard as it is now
    from dbot_ds.files import file_sha256
    cut = tmp_path / "train-000001.tar"
    data["shards"][1].update(samples=3, bytes=cut.stat().st_size, sha256=file_sha256(cut))
    manifest.write_text(json.dumps(data))
    problems = verify(manifest, progress=False)
    assert len(problems) == 1 and "no end-of-archive blocks" in problems[0]


@pytest.mark.parametrize("flags,name", [("cf", "gnu.tar"), ("czf", "gnu.tar.gz")])
def test_shards_written_by_gnu_tar_plain_or_gzipped_index_and_read_whole(tmp_path, flags, name):
    from helpers import jpeg

    members = tmp_path / "members"
    members.mkdir()
    for i in range(3):
        (members / f"s{i}.jpg").write_bytes(jpeg(i))
        (members / f"s{i}.cls").write_text(str(i % 2))
    subprocess.run(["tar", flags, str(tmp_path / name), "-C", str(members),
                    *sorted(p.name for p in members.iterdir())], check=True)
    manifest = index([str(tmp_path / name)], tmp_path / "manifest.json")
    assert [s.samples for s in manifest.shards] == [3]
    assert [s["__key__"] for s in iter_shard_samples(str(tmp_path / name))] == ["s0", "s1", "s2"]


def test_compressed_class_tars_are_named_and_an_odd_class_count_warns(tmp_path, capsys):
    root = tmp_path / "tree"
    mini_imagenet(root)
    tar = ilsvrc_tar_of_tars(root, tmp_path / "train.tar")
    items, classes = sources.ilsvrc_train_tar(tar)
    assert len(classes) == 3
    warning = capsys.readouterr().err.strip()
    assert "\n" not in warning and warning.startswith("warning: ") and "3 class tars, ILSVRC2012 has 1000" in warning
    with tarfile.open(tar, "a") as outer:
        info = tarfile.TarInfo("n09999999.tar.gz")
        info.size = 4
        outer.addfile(info, io.BytesIO(b"\x1f\x8b\x08\x00"))
    with pytest.raises(sources.SourceError, match=r"compressed class tar\(s\) \(n09999999.tar.gz\)"):
        sources.ilsvrc_train_tar(tar)


def test_a_truncated_class_tar_is_called_truncated(tmp_path):
    root = tmp_path / "tree"
    mini_imagenet(root)
    whole = ilsvrc_tar_of_tars(root, tmp_path / "train.tar")
    with tarfile.open(whole) as outer:
        last = outer.getmembers()[-1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: last.offset_data + last.size // 2])
    with pytest.raises(sources.SourceError, match=f"{last.name} is truncated"):
        sources.ilsvrc_train_tar(cut)


# ---------------------------------------------------------------- 8. cleanup

def test_a_worker_error_message_is_its_last_line_not_the_first_quoted_one():
    from dbot_ds.errors import message

    text = ("Caught ShardError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            "dbot_ds.data.shards.ShardError: the first, which caused\n\nThe above exception was the direct "
            "cause of the following exception:\n\nTraceback (most recent call last):\n"
            "  File \"x.py\", line 1, in f\ndbot_ds.data.shards.ShardError: the one to show")
    assert message(ShardError(text)) == "the one to show"

