"""2-process runs under torchrun (gloo on CPU): ZeRO-2 and ZeRO-3, across a breakpoint."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env, tiny_args

from dbot_ds.runtime import checkpoint
from dbot_ds.runtime.distributed import free_port
from dbot_ds.weights.export import read_export

HERE = Path(__file__).parent


def torchrun(*args, timeout=300, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def pretrain_args(out: Path, zero: int, *sets: str) -> list[str]:
    ds = out.parent / f"zero{zero}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": zero}, "bf16": {"enabled": False}}))
    return ["pretrain", "--out", str(out), *tiny_args(f"deepspeed={ds}", *sets)]


def pretrain_2proc(out: Path, zero: int, *sets: str):
    r = torchrun("-m", "dbot_ds.cli", *pretrain_args(out, zero, *sets))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_reinitialised_student_is_identical_on_two_ranks():
    r = torchrun(str(HERE / "dist_replicas.py"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("replicas check OK") == 2


@pytest.mark.parametrize("zero", [2, 3])
def test_two_process_run_across_a_breakpoint(tmp_path, zero):
    out = tmp_path / "run"
    pretrain_2proc(out, zero, "stop_at_step=10")  # 8 steps per stage: stop 2 steps into stage 2
    state = checkpoint.read_state(checkpoint.latest(out / "checkpoints"))
    assert (state["stage"], state["step"], state["world_size"], state["zero_stage"]) == (2, 2, 2, zero)
    pretrain_2proc(out, zero)  # resume
    student, meta = read_export(out / "stage2")
    assert meta["stage"] == 2 and set(student) >= {"encoder.cls_token", "decoder.mask_token", "head.weight"}
    assert meta["teacher_sha256"] == read_export(out / "stage1")[1]["sha256"]


def test_deepspeed_launcher_runs_two_ranks(tmp_path):
    out = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", "dbot_ds.cli", *pretrain_args(out, 1, "stages.epochs=[1,1]")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("stage export:") == 2  # printed by rank 0 only, one line per stage
    assert checkpoint.read_state(checkpoint.latest(out / "checkpoints"))["world_size"] == 2


def universal_tensors(ckpt) -> dict:
    """Every parameter's fp32 weights, Adam moments and step, in the world-size-free format."""
    out = {}
    for f in sorted((checkpoint.universal(ckpt) / "zero").glob("*/*.pt")):
        value = torch.load(f, weights_only=False)
        out[f"{f.parent.name}/{f.stem}"] = value["param"] if isinstance(value, dict) else value
    return out


@pytest.mark.parametrize("zero", [1, 2])
@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_a_checkpoint_resumes_on_another_number_of_ranks_with_its_weights_and_moments(
        process_group, tmp_path, zero, saved_on, resumed_on):
    out = tmp_path / "run"
    args = pretrain_args(out, zero, "stop_at_step=6")  # mid-stage 1
    r = torchrun("-m", "dbot_ds.cli", *args, nproc=saved_on)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = checkpoint.latest(out / "checkpoints")
    assert checkpoint.read_state(saved)["world_size"] == saved_on
    r = torchrun(str(HERE / "dist_resave.py"), str(out), str(tmp_path / "resaved"), nproc=resumed_on)
    assert r.returncode == 0, r.stderr[-3000:]
    resaved = checkpoint.latest(tmp_path / "resaved")
    assert checkpoint.read_state(resaved)["world_size"] == resumed_on
    before, after = universal_tensors(saved), universal_tensors(resaved)
    assert before.keys() == after.keys() and any(k.endswith("/exp_avg_sq") for k in before)
    assert all(torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k])) for k in before), \
        [k for k in before if not torch.equal(torch.as_tensor(before[k]), torch.as_tensor(after[k]))][:5]
    # and the run itself goes on to the end on the new number of ranks
    r = torchrun("-m", "dbot_ds.cli", *pretrain_args(out, zero), nproc=resumed_on)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_export(out / "stage2")[1]["stage"] == 2


def test_a_divergence_on_one_rank_rolls_every_rank_back_to_the_same_checkpoint(tmp_path):
    r = torchrun(str(HERE / "dist_rollback.py"), str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = sorted(line for line in r.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":", 1)[1] for line in lines] == \
        [" finished=True step=12 rollbacks=1 data_skip=2 back_to=stage1-step00000004"] * 2
