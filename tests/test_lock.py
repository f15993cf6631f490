"""A run directory is one writer's: a second run on it is refused before it writes anything;
a stale lock (a killed process, a requeued Slurm job) is taken over."""

import json
import socket
import subprocess
import sys
import time

import pytest
from helpers import subprocess_env, tiny_args, tiny_config

from dbot_ds.commands.pretrain import pretrain
from dbot_ds.config import ConfigError
from dbot_ds.runtime import checkpoint, lock


def cli(out, *sets, **kw):
    cmd = [sys.executable, "-m", "dbot_ds.cli", "pretrain", "--out", str(out), *tiny_args(*sets)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), **kw)


def test_a_second_run_on_a_run_directory_in_use_is_refused_and_the_first_finishes_alone(tmp_path):
    out = tmp_path / "run"
    first = cli(out, "data.synthetic_images=320", "checkpoint.every_steps=5")  # 2 x 40 steps
    deadline = time.time() + 120
    while time.time() < deadline and not (checkpoint.latest(out / "checkpoints") and (out / ".lock").is_file()):
        assert first.poll() is None, first.communicate()[1][-2000:]
        time.sleep(0.05)
    second = cli(out, "data.synthetic_images=320", "checkpoint.every_steps=5")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err[-2000:]
    assert f"dbot-ds: error: {out} is in use by pid {first.pid} on {socket.gethostname()}" in err
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["stage"], r["step"]) for r in records]
    assert len(steps) == len(set(steps)) == 2 * 40 // 2  # every log line once (log_every=2)
    assert not (out / ".lock").exists()  # released at the end


def test_a_refused_resume_leaves_the_run_config_as_it_was(process_group, tmp_path):
    pretrain(tiny_config("stop_at_step=3"), tmp_path)
    before = (tmp_path / "config.json").read_text(), (tmp_path / "ds_config.json").read_text()
    with pytest.raises(ConfigError, match="mask.ratio: checkpoint 0.75, now 0.6"):
        pretrain(tiny_config("mask.ratio=0.6"), tmp_path)
    assert ((tmp_path / "config.json").read_text(), (tmp_path / "ds_config.json").read_text()) == before


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_left_by_a_killed_process_on_this_host_is_taken_over(process_group, tmp_path, capsys):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "slurm_job": None,
                                                "since": "2026-01-01T00:00:00+00:00"}))
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path)
    printed = capsys.readouterr().out
    assert "took over the stale lock" in printed and "is gone" in printed
    assert (tmp_path / "stage1" / "meta.json").is_file()


def test_which_locks_are_stale():
    here = lock.me()
    job = {**here, "slurm_job": "77", "slurm_restart": 0}
    assert lock.stale_reason(job, {**job, "slurm_restart": 1}) == "it is this Slurm job (77) before its requeue"
    assert lock.stale_reason(job, job) is None  # a second live run inside the same allocation: refused
    assert "is gone" in lock.stale_reason({**here, "pid": dead_pid()}, here)
    assert lock.stale_reason(here, here) is None  # a live process: this one
    assert lock.stale_reason({"host": "elsewhere", "pid": 1, "slurm_job": None}, here) is None  # cannot tell
    assert lock.stale_reason({}, here) is None  # being written: not provably stale


def test_a_live_holder_is_named_with_the_way_out(tmp_path):
    path = tmp_path / ".lock"
    lock.acquire(path)
    holder = json.loads(path.read_text())
    path.write_text(json.dumps({**holder, "host": "gpu-node-7", "pid": 4242}))
    with pytest.raises(lock.RunLocked, match=f"in use by pid 4242 on gpu-node-7 .* delete {path}"):
        lock.acquire(path)


def test_a_damaged_lock_file_is_named_not_guessed_stale(tmp_path):
    path = tmp_path / ".lock"
    path.write_text("{not json")
    with pytest.raises(lock.RunLocked, match=f"names no holder .* delete {path}"):
        lock.acquire(path)
