"""The installed `dbot-ds` console script, as a user runs it."""

import json
import shutil
import subprocess

import pytest
from helpers import subprocess_env


def dbot_ds(*args, timeout=300):
    exe = shutil.which("dbot-ds")
    assert exe, "the dbot-ds console script is not installed (pip install -e .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def test_demo_recipe_leaves_two_stage_exports_and_its_resolved_configs(tmp_path):
    out = tmp_path / "demo"
    r = dbot_ds("pretrain", "--recipe", "demo", "--out", str(out),
                "--set", "stages.epochs=[1,1]", "--set", "data.synthetic_images=256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"stage export: {out / 'stage1'}" in r.stdout and f"stage export: {out / 'stage2'}" in r.stdout
    assert "stage 2/2" in r.stderr  # the progress bar
    for stage in (1, 2):
        meta = json.loads((out / f"stage{stage}" / "meta.json").read_text())
        assert meta["stage"] == stage and meta["recipe"] == "demo"
    assert json.loads((out / "config.json").read_text())["stages"]["epochs"] == [1, 1]
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"stage", "epoch", "step", "loss", "lr", "images_per_s"} <= set(records[-1])
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())


@pytest.mark.parametrize("args, message", [
    (["--set", "mask.ratio=1.5"], "mask ratio must be in (0, 1)"),
    (["--set", "optim.lr_peak=1"], "unknown config key(s): optim.lr_peak"),
    (["--set", "batch.micro_batch=48"], "not a multiple of batch.micro_batch 48"),
    (["--set", "teacher.init=/nonexistent/export"], "no meta.json in /nonexistent/export"),
])
def test_bad_input_exits_2_with_the_problem_before_any_work(tmp_path, args, message):
    out = tmp_path / "run"
    r = dbot_ds("pretrain", "--recipe", "demo", "--out", str(out), *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_bench_data_prints_rates_and_ratios(tmp_path):
    r = dbot_ds("bench-data", "--images", "40", "--repeats", "1", "--workers", "1",
                "--json", str(tmp_path / "bench.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "full_pipeline_per_core / raw_decode" in r.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["images_per_s"]["raw_decode"] > 0 and result["ratios"]["resized / full (per core)"] > 0


def test_shards_subcommands_are_reachable_from_dbot_ds(tmp_path):
    from helpers import mini_imagenet
    mini_imagenet(tmp_path / "train")
    r = dbot_ds("shards", "convert", "--imagefolder", str(tmp_path / "train"), "--out", str(tmp_path / "s"),
                "--shard-size", "8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "18 samples, 3 classes" in r.stdout and '"jpeg-cmyk": 1' in r.stdout
    r = dbot_ds("shards", "verify", str(tmp_path / "s" / "manifest.json"))
    assert r.returncode == 0 and "OK" in r.stdout
