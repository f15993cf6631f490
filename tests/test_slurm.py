"""The Slurm stage chain on a real (throwaway, local, 2-node) Slurm cluster, tiny models on CPU."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PAPER_DATA, subprocess_env, tiny_args, tiny_export, write_shards

from dbot_ds.runtime import checkpoint
from dbot_ds.weights.export import read_meta

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture(scope="module")
def slurm():
    """The cluster .ci/run started (SLURM_CONF set), or one started (and stopped) here."""
    if os.environ.get("DBOT_SKIP_SLURM") == "1":
        pytest.skip("DBOT_SKIP_SLURM=1")
    env = subprocess_env()
    started = False
    if not (env.get("SLURM_CONF") and subprocess.run(["sinfo"], env=env, capture_output=True).returncode == 0):
        env["DBOT_SLURM_DIR"] = "/tmp/dbot-slurm-pytest"
        r = subprocess.run([str(ROOT / "slurm" / "cluster.sh"), "start"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"could not start the test Slurm cluster:\n{r.stdout}\n{r.stderr}"
        env["SLURM_CONF"] = "/tmp/dbot-slurm-pytest/slurm.conf"
        started = True
    env["PYTHONUNBUFFERED"] = "1"
    yield env
    if started:
        subprocess.run([str(ROOT / "slurm" / "cluster.sh"), "stop"], env=env, check=True)


def submit(env, out, *args):
    cmd = [sys.executable, "-m", "dbot_ds.cli", "slurm", "submit", "--out", str(out), "--gpus-per-node", "0",
           "--time", "10", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return re.findall(r"job (\d+)", r.stdout)


def job_state(env, job) -> str:
    r = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    return re.search(r"JobState=(\w+)", r.stdout).group(1) if r.returncode == 0 else "GONE"


def wait_done(env, jobs, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [job_state(env, j) for j in jobs]
        if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE") for s in states):
            return states
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} still {states} after {timeout}s")


def log(out, stage=1):
    return (Path(out) / "logs" / f"stage{stage}.log").read_text()


def wait_for_checkpoint(out, global_step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = checkpoint.latest(Path(out) / "checkpoints")
        if found and checkpoint.read_state(found)["global_step"] >= global_step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint at step {global_step} in {out} after {timeout}s")


def test_a_two_stage_chain_completes_and_stage2_learns_from_stage1(slurm, tmp_path):
    out = tmp_path / "run"
    jobs = submit(slurm, out, *tiny_args())
    assert len(jobs) == 2
    assert wait_done(slurm, jobs) == ["COMPLETED", "COMPLETED"], log(out, 1)[-3000:] + log(out, 2)[-3000:]
    assert read_meta(out / "stage2")["teacher_sha256"] == read_meta(out / "stage1")["sha256"]


def test_a_failing_stage_cancels_its_dependents(slurm, tmp_path):
    out = tmp_path / "run"
    jobs = submit(slurm, out, *tiny_args("teacher.init=/nonexistent/teacher"))
    assert wait_done(slurm, jobs) == ["FAILED", "CANCELLED"]
    assert "no meta.json in /nonexistent/teacher" in log(out, 1)


def test_a_stage_with_a_missing_teacher_fails_fast_with_the_message(slurm, tmp_path):
    out = tmp_path / "run"
    jobs = submit(slurm, out, "--first-stage", "2", *tiny_args())
    assert wait_done(slurm, jobs) == ["FAILED"]
    assert f"stage 2 needs stage 1's export as its teacher: no meta.json in {out / 'stage1'}" in log(out, 2)
    assert not (out / "checkpoints").exists()


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(slurm, tmp_path):
    longer = ("stages.epochs=[3]", "data.synthetic_images=1024", "checkpoint.every_steps=2")
    (straight,) = submit(slurm, tmp_path / "straight", *tiny_args(*longer))  # same launcher, same threads
    out = tmp_path / "run"
    (job,) = submit(slurm, out, *tiny_args(*longer))
    wait_for_checkpoint(out, 6)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    assert wait_done(slurm, [job, straight]) == ["COMPLETED", "COMPLETED"], log(out)[-3000:]
    text = log(out)
    assert "preempted: checkpoint saved at stage 1" in text and "requeueing job" in text
    assert "(restart 1)" in text  # SLURM_RESTART_COUNT=1 on the rerun
    assert read_meta(out / "stage1")["sha256"] == read_meta(tmp_path / "straight" / "stage1")["sha256"]


@pytest.fixture(scope="module")
def to_finetune(tmp_path_factory, process_group):
    """A tiny stage export, labelled train shards (128 images: 16 steps an epoch at batch 8) and
    validation shards."""
    root = tmp_path_factory.mktemp("to-finetune")
    return tiny_export(root), write_shards(root / "train", [64, 64]), write_shards(root / "val", [16])


def submit_finetune(env, out, export, train, val, *sets):
    cmd = [sys.executable, "-m", "dbot_ds.cli", "slurm", "finetune", str(export), "--train", str(train),
           "--val", str(val), "--out", str(out), "--gpus-per-node", "0", "--time", "10",
           *[a for s in ("deepspeed=cpu_demo", "batch.global_batch=8", "batch.micro_batch=4", "epochs=8",
                         "optim.warmup_epochs=1", "data.num_workers=0", "checkpoint.every_steps=4", *sets)
             for a in ("--set", s)]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return re.findall(r"job (\d+)", r.stdout)


def test_usr1_checkpoints_a_finetune_requeues_it_and_it_ends_with_the_uninterrupted_weights(
        slurm, to_finetune, tmp_path):
    from safetensors.torch import load_file

    (straight,) = submit_finetune(slurm, tmp_path / "straight", *to_finetune)
    out = tmp_path / "run"
    (job,) = submit_finetune(slurm, out, *to_finetune)
    wait_for_checkpoint(out, 8)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    text = lambda: (out / "logs" / "finetune.log").read_text()  # noqa: E731
    assert wait_done(slurm, [job, straight]) == ["COMPLETED", "COMPLETED"], text()[-3000:]
    assert "preempted: checkpoint saved at stage 1" in text() and "requeueing job" in text()
    assert "(restart 1)" in text()
    resumed, uninterrupted = (load_file(str(d / "model.safetensors")) for d in (out, tmp_path / "straight"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    evaluation = lambda d: {k: json.loads((d / "metrics.json").read_text())["best"][k]  # noqa: E731
                            for k in ("step", "top1", "top5")}
    assert evaluation(out) == evaluation(tmp_path / "straight")


def test_a_two_node_job_runs_one_rank_per_node_with_real_deepspeed_steps(slurm, tmp_path):
    out = tmp_path / "run"
    (job,) = submit(slurm, out, "--nodes", "2", *tiny_args("stages.epochs=[1]"))
    assert wait_done(slurm, [job]) == ["COMPLETED"], log(out)[-3000:]
    state = checkpoint.read_state(checkpoint.latest(out / "checkpoints"))
    assert state["world_size"] == 2 and state["step"] == 4
    assert "on n[1-2]" in log(out)


def test_dry_run_prints_the_exact_chain_without_submitting(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dbot_ds.cli", "slurm", "submit", "--recipe", "vit_base", "--out", str(out),
           "--nodes", "4", "--partition", "gpu", "--account", "proj", "--then", "finetune.sbatch --x", "--dry-run",
           "--set", PAPER_DATA]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("sbatch --parsable") for line in lines)
    assert "--nodes=4" in lines[0] and "--partition=gpu" in lines[0] and "--account=proj" in lines[0]
    assert "--gpus-per-node=8" in lines[0] and "dependency" not in lines[0]
    assert "'--dependency=afterok:<stage1>' --kill-on-invalid-dep=yes" in lines[1]
    assert lines[0].endswith(f"train.sbatch {out} stage1/meta.json pretrain --stage 1 --out {out} "
                             f"--recipe=vit_base --set={PAPER_DATA}")
    assert "'--dependency=afterok:<stage2>'" in lines[2] and lines[2].endswith("finetune.sbatch --x")
    assert not out.exists()


def test_finetune_dry_run_prints_one_requeueing_job_after_the_given_one(tmp_path):
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "dbot_ds.cli", "slurm", "finetune", str(tmp_path / "run" / "stage2"), "--train",
           "t.json", "--val", "v.json", "--out", str(out), "--recipe", "vit_base", "--after", "123", "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.strip().splitlines()
    assert "--dependency=afterok:123 --kill-on-invalid-dep=yes" in line and f"--output={out / 'logs' / 'finetune.log'}" in line
    assert line.endswith(f"train.sbatch {out} metrics.json finetune {tmp_path / 'run' / 'stage2'} --out {out} "
                         f"--train={ROOT / 't.json'} --val={ROOT / 'v.json'} --recipe=vit_base")
    assert not out.exists()


def test_a_bad_config_is_refused_before_anything_is_submitted(tmp_path):
    cmd = [sys.executable, "-m", "dbot_ds.cli", "slurm", "submit", "--recipe", "vit_base", "--out",
           str(tmp_path / "run"), "--set", "mask.ratio=2", "--dry-run"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert r.returncode == 2 and "mask ratio must be in (0, 1)" in r.stderr


def test_a_lock_of_a_slurm_job_that_no_longer_runs_is_taken_over(slurm, tmp_path, monkeypatch):
    """A job killed on a node that is gone left its lock: Slurm says the job has ended."""
    from dbot_ds.runtime import lock

    r = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'true.log'}", "--wrap", "true"],
                       env=slurm, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    assert wait_done(slurm, [job]) == ["COMPLETED"]
    for key in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(key, slurm[key])
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"host": "node-that-died", "pid": 4242, "slurm_job": job, "since": "2026-01-01"}))
    assert lock.acquire(path) == f"Slurm job {job} is no longer running"
    assert json.loads(path.read_text())["pid"] == os.getpid()
