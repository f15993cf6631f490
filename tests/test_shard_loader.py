"""The shard loader: exact epochs across ranks and workers, resume, bad data, foreign shards."""

import pytest
import torch
import webdataset as wds
from helpers import read_epoch, read_flat, solid_index, solid_jpeg, stream, write_shards
from torch.utils.data import DataLoader

from dbot_ds.data.epoch_plan import Layout
from dbot_ds.data.shard_loader import ShardStream
from dbot_ds.data.shards import ShardError
from dbot_ds.data.tools.verify import index


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("uneven"), [7, 13, 1, 11, 16])  # 48 samples


def test_two_ranks_two_workers_read_every_sample_once_in_equal_batches(uneven):
    ranks = [stream(uneven, rank=r, world=2, micro=4, accum=2) for r in (0, 1)]
    batches = [read_epoch(ds, epoch=0) for ds in ranks]
    assert len(batches[0]) == len(batches[1]) == ranks[0].batches_per_epoch == 6
    seen = [i for rank in batches for batch in rank for i in batch]
    assert sorted(seen) == list(range(48))


def test_order_changes_with_the_epoch_and_repeats_with_the_seed(uneven):
    a0 = read_epoch(stream(uneven, world=1, micro=4), epoch=0)
    a1 = read_epoch(stream(uneven, world=1, micro=4), epoch=1)
    b0 = read_epoch(stream(uneven, world=1, micro=4), epoch=0)
    c0 = read_epoch(stream(uneven, world=1, micro=4, seed=1), epoch=0)
    assert a0 == b0 and a0 != a1 and a0 != c0
    assert sorted(i for b in a1 for i in b) == list(range(48))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_mid_epoch_resume_yields_exactly_the_unseen_samples_in_order(uneven, workers):
    full = read_epoch(stream(uneven, micro=4, accum=2), epoch=3, workers=workers)
    resumed = read_epoch(stream(uneven, micro=4, accum=2), epoch=3, workers=workers, step=2)
    assert resumed == full[2 * 2:]  # 2 optimizer steps of 2 micro-batches each were done


def test_a_corrupt_jpeg_and_a_truncated_shard_are_skipped_and_counted(tmp_path, caplog):
    manifest = write_shards(tmp_path / "bad", [10, 10, 12], corrupt={3}, truncate=1)
    ds = stream(manifest, micro=4, max_bad_fraction=0.9)
    batches = read_epoch(ds, epoch=0, workers=0)
    assert len(batches) == 8 and all(len(b) == 4 for b in batches)
    seen = {i for b in batches for i in b}
    assert 3 not in seen and not seen & set(range(15, 20))  # the corrupt one and the lost tail
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "s00003" in messages and "train-000001.tar: unreadable" in messages


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path):
    manifest = write_shards(tmp_path / "bad", [8, 8], corrupt={1, 2, 3})
    with pytest.raises(ShardError, match="exceed data.max_bad_fraction 0.1.*dbot-ds shards verify"):
        read_epoch(stream(manifest, micro=4, max_bad_fraction=0.1), epoch=0, workers=0)


def test_webdataset_shardwriter_output_in_the_timm_layout_is_read(tmp_path):
    pattern = str(tmp_path / "imagenet1k-train-%04d.tar")
    with wds.ShardWriter(pattern, maxcount=10) as sink:
        for i in range(30):
            sink.write({"__key__": f"n0000_{i}", "jpg": solid_jpeg(i), "cls": i % 5,
                        "json": {"label": i % 5, "filename": f"n0000_{i}.JPEG"}})
    urls = sorted(str(p) for p in tmp_path.glob("imagenet1k-train-*.tar"))
    # exact epochs through a manifest made by `dbot-ds shards index`
    m = index(urls, tmp_path / "manifest.json")
    assert m.total == 30
    batches = read_epoch(stream(tmp_path / "manifest.json", micro=5), epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(30))
    # resampled mode over a brace pattern or pipe: URLs, no manifest needed
    for source in (urls, [f"pipe:cat {u}" for u in urls]):
        ds = ShardStream(urls=source, epoch_samples=20, rank=0, world=1, micro=5, accum=1, seed=0,
                         crop=16, scale=(0.5, 1.0), hflip=False)
        got = read_epoch(ds, epoch=0)
        assert len(got) == 4 and all(0 <= i < 30 for b in got for i in b)


def test_device_decode_path_gives_the_same_samples_as_the_cpu_path(uneven):
    """The accelerator path (run here on the CPU) reads the same samples, boxes and flips."""
    from dbot_ds.data.device_decode import collate_jpegs, decode_batch

    cpu = read_epoch(stream(uneven, micro=4), epoch=0, workers=2)
    ds = stream(uneven, micro=4, decode="device")
    ds.set_position(0, 0)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_jpegs))
    got = []
    for b in batches:
        imgs = decode_batch(b, 16, torch.device("cpu"), torch.float32)
        assert imgs.shape == (4, 3, 16, 16)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        got.append([solid_index((img * std[0] + mean[0]) * 255) for img in imgs])
    assert got == cpu


def test_the_prefetcher_hands_over_normalised_images_in_loader_order(uneven):
    from dbot_ds.data.prefetch import DevicePrefetcher
    from dbot_ds.data.transforms import normalize_on_device
    cpu = torch.device("cpu")
    ds = stream(uneven, micro=4)
    ds.set_position(0, 0)
    direct = [normalize_on_device(b, cpu, torch.bfloat16) for b in DataLoader(ds, batch_size=4)]
    ds.set_position(0, 0)
    prefetched = list(DevicePrefetcher(DataLoader(ds, batch_size=4), cpu, torch.bfloat16, 16))
    assert len(direct) == len(prefetched) and all(torch.equal(a, b) for a, b in zip(direct, prefetched))


def test_device_decode_batches_cross_from_the_workers_as_one_byte_tensor_and_decode_ahead(uneven):
    """One flat uint8 tensor + offsets per batch (not one shared-memory tensor per image); the
    prefetcher's thread decodes and crops them to the CPU path's images."""
    from dbot_ds.data.device_decode import collate_jpegs
    from dbot_ds.data.prefetch import DevicePrefetcher
    cpu = torch.device("cpu")
    ds = stream(uneven, micro=4, decode="device")
    ds.set_position(0, 0)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_jpegs)))
    assert batch.data.dim() == 1 and batch.data.dtype == torch.uint8 and batch.offsets.tolist()[0] == 0
    assert batch.offsets[-1] == len(batch.data) and len(batch.offsets) == 5
    ds.set_position(0, 0)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_jpegs)
    decoded = list(DevicePrefetcher(loader, cpu, torch.float32, 16))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert [[solid_index((img * std + mean) * 255) for img in b] for b in decoded] == \
        read_epoch(stream(uneven, micro=4), epoch=0, workers=2)


def test_a_loader_error_reaches_the_consumer_of_the_prefetcher(tmp_path):
    from dbot_ds.data.prefetch import DevicePrefetcher
    manifest = write_shards(tmp_path, [8], corrupt=set(range(8)))
    ds = stream(manifest, micro=4)
    ds.set_position(0, 0)
    with pytest.raises(ShardError, match="bad samples exceed data.max_bad_fraction"):
        list(DevicePrefetcher(DataLoader(ds, batch_size=4), torch.device("cpu"), torch.float32, 16))


def test_leaving_an_epoch_early_stops_the_prefetch_thread(uneven):
    import threading

    from dbot_ds.data.prefetch import DevicePrefetcher
    ds = stream(uneven, micro=4)
    ds.set_position(0, 0)
    for _ in DevicePrefetcher(DataLoader(ds, batch_size=4), torch.device("cpu"), torch.float32, 16, ahead=1):
        break  # a stop request mid-epoch
    assert not any(t.name == "dbot-prefetch" and t.is_alive() for t in threading.enumerate())


def test_the_device_decode_path_counts_a_cmyk_jpeg_as_a_bad_sample(tmp_path, caplog):
    """nvJPEG reads YCbCr and gray: in device-decode mode a CMYK JPEG fails in the worker, which
    skips, counts and logs it, and the batch is still full."""
    import numpy as np
    import simplejpeg

    from dbot_ds.data.device_decode import collate_jpegs

    cmyk = simplejpeg.encode_jpeg(np.full((16, 16, 4), 99, np.uint8), colorspace="CMYK")
    gray = simplejpeg.encode_jpeg(np.full((16, 16, 1), 99, np.uint8), colorspace="GRAY")
    manifest = write_shards(tmp_path, [8, 8], replace={5: cmyk, 9: gray})
    ds = stream(manifest, micro=4, decode="device", max_bad_fraction=0.5)
    ds.set_position(0, 0)
    batches = list(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_jpegs))
    assert [len(b) for b in batches] == [4, 4, 4, 4]
    bad = [r.getMessage() for r in caplog.records if "bad sample" in r.getMessage()]
    assert len(bad) == 1 and "s00005" in bad[0] and "YCCK JPEG: the device decoder reads YCbCr and gray only" in bad[0]


@pytest.mark.parametrize("before,after", [((2, 2), (1, 2)), ((1, 2), (2, 3)), ((2, 1), (3, 2))],
                         ids=["2ranks-to-1", "1rank-to-2-more-workers", "2ranks-to-3"])
def test_resumed_in_another_layout_an_epoch_reads_exactly_its_unseen_samples(tmp_path, before, after):
    """Steps 0-1 of epoch 1 read by one layout (ranks, workers), the rest by another: every
    sample of the epoch read once (global batch 12, 6 steps an epoch of 72)."""
    manifest = write_shards(tmp_path, [13, 7, 20, 11, 21])  # 72 samples
    (w0, k0), (w1, k1) = before, after
    seen = [i for r in range(w0) for i in read_flat(stream(manifest, rank=r, world=w0, micro=2, accum=6 // w0),
                                                   1, 0, workers=k0)[: 2 * 12 // w0]]
    rest = [i for r in range(w1) for i in read_flat(stream(manifest, rank=r, world=w1, micro=2, accum=6 // w1),
                                                   1, 2, (Layout(w0, k0, 2),), workers=k1)]
    assert len(seen) == 24 and len(rest) == 48
    assert sorted(seen + rest) == list(range(72))


def test_a_shard_whose_size_differs_from_the_manifest_is_a_bad_shard(tmp_path, caplog):
    manifest = write_shards(tmp_path, [10, 10, 12])
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])  # truncated after the manifest was written
    batches = read_epoch(stream(manifest, micro=4, max_bad_fraction=0.5), epoch=0, workers=0)
    assert not {i for b in batches for i in b} & set(range(10, 20))  # none of it read
    assert "train-000001.tar: 39936 bytes, the manifest says 40960 (truncated or replaced?)" in caplog.text


def test_with_verify_sha256_a_shard_changed_in_place_is_a_bad_shard(tmp_path, caplog):
    manifest = write_shards(tmp_path, [10, 10, 12])
    shard = tmp_path / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # inside the last sample's bytes (padding is zeros): same size
    shard.write_bytes(bytes(data))
    plain = read_epoch(stream(manifest, micro=4, max_bad_fraction=0.5), epoch=0, workers=0)
    assert "sha256" not in caplog.text and len(plain) == 8  # a stat sees nothing
    read_epoch(stream(manifest, micro=4, max_bad_fraction=0.5, verify="sha256"), epoch=0, workers=0)
    assert "train-000002.tar: sha256 differs from the manifest's" in caplog.text


def test_a_manifest_naming_shards_outside_its_folder_is_refused(tmp_path):
    import json

    from dbot_ds.data.shards import read_manifest

    manifest = write_shards(tmp_path / "set", [4])
    data = json.loads(manifest.read_text())
    data["shards"][0]["name"] = "../elsewhere/train-000000.tar"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShardError, match=r"names shards outside its own folder \(../elsewhere/train-000000.tar\)"):
        read_manifest(manifest)
    data["shards"][0]["name"] = "/abs/train-000000.tar"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShardError, match="outside its own folder"):
        read_manifest(manifest)


def test_a_truncated_shard_in_a_loader_worker_reaches_the_user_as_one_line(tmp_path):
    import subprocess
    import sys

    from helpers import subprocess_env, tiny_args

    manifest = write_shards(tmp_path / "s", [40, 40], truncate=1)
    r = subprocess.run([sys.executable, "-m", "dbot_ds.cli", "pretrain", "--out", str(tmp_path / "run"),
                        *tiny_args("data.source=shards", f"data.shards={manifest}", "data.num_workers=2",
                                   "stages.epochs=[1]")], capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dbot-ds: error: rank 0 worker ") and "bad samples exceed data.max_bad_fraction" in last
    assert "Traceback" not in r.stderr


def test_index_refuses_to_write_a_manifest_that_would_point_outside_its_folder(tmp_path):
    write_shards(tmp_path / "shards", [4])
    with pytest.raises(ShardError, match="lie outside .*write it with --out in a folder above every shard"):
        index([str(tmp_path / "shards" / "train-000000.tar")], tmp_path / "elsewhere" / "manifest.json")


def test_a_manifest_of_remote_urls_streams_exact_epochs_and_resumes_like_local_shards(tmp_path):
    """Shards behind `pipe:` URLs (here `cat`; `aws s3 cp ... -` on a cluster), indexed and
    verified through the same opener: the same samples, epochs and resume as the local set."""
    from dbot_ds.data.tools.verify import verify

    local = write_shards(tmp_path / "local", [7, 13, 1, 11, 16])
    urls = [f"pipe:cat {p}" for p in sorted((tmp_path / "local").glob("*.tar"))]
    remote = tmp_path / "elsewhere" / "manifest.json"
    index(urls, remote, classes=["a", "b", "c"])
    with pytest.raises(ShardError, match="fetches shards by running shell commands.*data.pipe_urls=true"):
        stream(remote)
    assert verify(remote, progress=False, pipe_urls=True) == []
    by_url, by_path = stream(remote, pipe_urls=True), stream(local)
    assert read_epoch(by_url, epoch=2) == read_epoch(by_path, epoch=2)
    assert read_epoch(by_url, epoch=2, step=3) == read_epoch(by_path, epoch=2)[3:]


def test_a_url_template_turns_names_into_urls(tmp_path):
    import json

    local = write_shards(tmp_path / "local", [8, 8])
    data = json.loads(local.read_text())
    data["url_template"] = f"pipe:cat {tmp_path / 'local'}/{{name}}"
    templated = tmp_path / "t" / "manifest.json"
    templated.parent.mkdir()
    templated.write_text(json.dumps(data))
    assert read_epoch(stream(templated, pipe_urls=True), epoch=0) == read_epoch(stream(local), epoch=0)
