"""Resume: stopping and resuming anywhere gives bit-identical weights (fp32 on CPU)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import subprocess_env, tiny_args, tiny_config

from dbot_ds.runtime import checkpoint
from dbot_ds.config import ConfigError
from dbot_ds.weights.export import ExportError, read_meta
from dbot_ds.commands.pretrain import pretrain


def _shas(run_dir):
    return [read_meta(run_dir / f"stage{s}")["sha256"] for s in (1, 2)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, process_group):
    out = tmp_path_factory.mktemp("straight")
    pretrain(tiny_config(), out)
    return _shas(out)


@pytest.mark.parametrize("stop_at", [6, 10], ids=["mid-stage1", "after-breakpoint"])
def test_stop_and_resume_gives_the_same_weights_as_a_straight_run(straight, tmp_path, stop_at):
    # 8 steps per stage: step 6 is mid-epoch in stage 1, step 10 is 2 steps into stage 2.
    pretrain(tiny_config(f"stop_at_step={stop_at}"), tmp_path)
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "checkpoints"))
    assert state["global_step"] == stop_at
    assert not (tmp_path / "stage2").exists()
    pretrain(tiny_config(), tmp_path, resume="auto")
    assert _shas(tmp_path) == straight


def test_ema_teacher_resumes_exactly(process_group, tmp_path):
    ema = ("teacher.update=ema_cosine", "teacher.momentum=0.996", "stages.epochs=[3]")
    pretrain(tiny_config(*ema), tmp_path / "a")
    pretrain(tiny_config(*ema, "stop_at_step=5"), tmp_path / "b")
    pretrain(tiny_config(*ema), tmp_path / "b")
    assert read_meta(tmp_path / "a" / "stage1")["sha256"] == read_meta(tmp_path / "b" / "stage1")["sha256"]


def test_a_partial_checkpoint_is_never_resumed_from(process_group, tmp_path):
    pretrain(tiny_config("stop_at_step=4"), tmp_path)
    root = tmp_path / "checkpoints"
    good = checkpoint.latest(root)
    # a crash in the middle of the next save leaves a .partial directory and the old pointer
    shutil.copytree(good, root / "stage1-step00000008.partial")
    (root / "stage1-step00000008.partial" / checkpoint.STATE).unlink()
    assert checkpoint.latest(root) == good
    # a pointer to a directory that is gone falls back to the newest complete one
    (root / checkpoint.POINTER).write_text("stage9-step00000001\n")
    assert checkpoint.latest(root) == good


def test_resume_with_a_changed_config_is_refused(process_group, tmp_path):
    pretrain(tiny_config("stop_at_step=3"), tmp_path)
    with pytest.raises(ConfigError, match="mask.ratio: checkpoint 0.75, now 0.6"):
        pretrain(tiny_config("mask.ratio=0.6"), tmp_path)


def test_resume_after_the_breakpoint_refuses_a_corrupted_teacher_export(process_group, tmp_path):
    pretrain(tiny_config("stop_at_step=10"), tmp_path)
    weights = tmp_path / "stage1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256 .* does not match meta.json"):
        pretrain(tiny_config(), tmp_path)


def test_a_killed_run_resumes_to_the_same_weights(process_group, tmp_path):
    """SIGKILL a real `dbot-ds pretrain` process mid-run, then resume it."""
    longer = ("data.synthetic_images=320", "checkpoint.every_steps=1")  # 2 x 40 steps
    pretrain(tiny_config(*longer), tmp_path / "straight")
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dbot_ds.cli", "pretrain", "--out", str(out),
           *tiny_args(*longer)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = checkpoint.latest(out / "checkpoints")
        if found and checkpoint.read_state(found)["global_step"] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = checkpoint.read_state(checkpoint.latest(out / "checkpoints"))["global_step"]
    assert 5 <= stopped_at < 80, "the run finished before it could be killed"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    assert _shas(out) == _shas(tmp_path / "straight")


def test_shard_training_resumes_mid_epoch_exactly_with_two_workers(process_group, tmp_path):
    shards = ("data.source=generated_shards", "data.num_workers=2", "data.synthetic_images=80",
              "data.shuffle_buffer=16")  # 5 steps per epoch
    pretrain(tiny_config(*shards), tmp_path / "straight")
    pretrain(tiny_config(*shards, "stop_at_step=7"), tmp_path / "resumed")  # mid-epoch, stage 1
    pretrain(tiny_config(*shards), tmp_path / "resumed")
    assert _shas(tmp_path / "resumed") == _shas(tmp_path / "straight")
    manifest = json.loads((tmp_path / "straight" / "data" / "shards" / "manifest.json").read_text())
    assert manifest["total"] == 80


def test_a_bf16_run_accumulates_gradients_in_fp32_and_resumes_exactly(process_group, tmp_path):
    """The shipped bf16 config (ZeRO-1, grad_accum_dtype fp32: DeepSpeed's BF16_Optimizer), with
    gradient accumulation 2: stop mid-stage 1, resume, same exports as a straight run."""
    import torch

    from dbot_ds.runtime import engine
    from dbot_ds.runtime.ds_config import resolve_ds_config
    from dbot_ds.method.stages import fresh_student

    cfg = tiny_config("deepspeed=vit_base")
    eng = engine.build_engine(fresh_student(cfg, 1, 32), cfg, resolve_ds_config(cfg, 1), torch.device("cpu"))
    assert eng.get_data_types() == (torch.bfloat16, torch.float32)
    eng.destroy()
    pretrain(cfg, tmp_path / "straight")
    pretrain(tiny_config("deepspeed=vit_base", "stop_at_step=6"), tmp_path / "resumed")
    pretrain(cfg, tmp_path / "resumed", resume="auto")
    assert _shas(tmp_path / "resumed") == _shas(tmp_path / "straight")
