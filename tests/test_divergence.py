"""A diverged run never passes for finished work: a non-finite loss (or too many skipped steps)
stops the run with no export, or rolls back to the last good checkpoint and goes on past the
data that diverged (real DeepSpeed engines, gloo, CPU, fp32)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import PoisonedFrom, subprocess_env, tiny_args, tiny_config

from dbot_ds.commands.pretrain import pretraining
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime.trainer import Diverged
from dbot_ds.weights.rundir import RunDir


def run_poisoned(tmp_path, first, count=1, *sets):
    """A one-stage tiny run (4 steps an epoch, 2 micro-batches a step, 3 epochs), checkpointed
    every 2 steps, whose loss turns NaN at micro-batch `first`."""
    cfg = tiny_config("stages.epochs=[3]", "checkpoint.every_steps=2", "checkpoint.keep=10", *sets)
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        trainer = job.trainer(PoisonedFrom(task, first, count), engine, 1)
        return trainer, trainer.fit(), engine


def test_a_run_whose_lr_explodes_exits_nonzero_and_writes_no_export(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dbot_ds.cli", "pretrain", "--out", str(out),
                        *tiny_args("optim.lr=1e6", "optim.warmup_epochs=0")],
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 3, r.stderr[-2000:]
    assert "dbot-ds: error: training diverged at stage 1" in r.stderr and "no export was written" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "stage1").exists() and not (out / "stage2").exists()


def test_the_stop_policy_names_the_last_good_checkpoint(process_group, tmp_path):
    with pytest.raises(Diverged, match=r"stage 1 steps 4..6: loss nan; no export was written. "
                                       r"Last good checkpoint: .*stage1-step00000004"):
        run_poisoned(tmp_path, first=10)  # step 5's second micro-batch; seen at the log of step 6
    steps = [checkpoint.read_state(c)["step"] for c in checkpoint.complete_checkpoints(tmp_path / "checkpoints")]
    assert steps == [2, 4]  # nothing saved from the diverged window


def test_the_rollback_policy_goes_back_and_on_past_the_data_that_diverged(process_group, tmp_path, capsys):
    trainer, outcome, engine = run_poisoned(tmp_path, 10, 1, "divergence.policy=rollback")
    assert outcome.finished and outcome.step == 12
    assert (trainer.rollbacks, trainer.data_skip) == (1, 2)  # back to step 4 from step 6
    assert "rollback 1/3 to" in capsys.readouterr().out
    state = checkpoint.read_state(checkpoint.latest(tmp_path / "checkpoints"))
    assert (state["step"], state["rollbacks"], state["data_skip"]) == (12, 1, 2)  # a resume keeps going past it
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12 and math.isfinite(records[-1]["loss"])
    assert {"grad_norm", "skipped_steps"} <= set(records[-1])
    engine.destroy()


def test_a_job_preempted_in_a_diverged_window_saves_nothing_and_stops(process_group, tmp_path, monkeypatch, capsys):
    from dbot_ds.runtime.preemption import STOP_FILE_ENV

    stop = tmp_path / "stop"
    stop.touch()  # polled at step 5, whose second micro-batch is poisoned
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    trainer, outcome, engine = run_poisoned(tmp_path / "run", 10, 1, "divergence.policy=rollback")
    engine.destroy()
    assert (outcome.step, outcome.finished, outcome.preempted, trainer.rollbacks) == (5, False, True, 0)
    steps = [checkpoint.read_state(c)["step"] for c in checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [2, 4]  # the requeued job resumes from step 4
    assert "as the job was preempted: nothing saved" in capsys.readouterr().out


def test_rollbacks_are_bounded(process_group, tmp_path):
    with pytest.raises(Diverged, match="after 1 rollbacks"):
        run_poisoned(tmp_path, 10, 100, "divergence.policy=rollback", "divergence.max_rollbacks=1")


def test_skipped_steps_beyond_the_allowed_number_are_a_divergence_with_a_finite_loss(process_group, tmp_path):
    """Non-finite gradients under a finite loss: DeepSpeed skips the step, the log counts it,
    and more than divergence.max_skipped_steps in a window stops the run."""
    cfg = tiny_config("stages.epochs=[1]", "log_every=1")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        calls = []

        def poison_third(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) == 3 else grad  # step 2's first micro-batch

        engine.module.head.weight.register_hook(poison_third)
        with pytest.raises(Diverged, match="steps 1..2: 1 optimizer steps skipped"):
            job.trainer(task, engine, 1).fit()
        assert engine.skipped_steps == 1
        engine.destroy()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["skipped_steps"] == 0 and records[0]["grad_norm"] > 0


def test_an_optimizer_that_never_skips_writes_no_checkpoint_or_export_from_non_finite_weights(process_group, tmp_path):
    """fp32 ZeRO-0 (torch's AdamW: no skipping) applies a NaN gradient under a finite loss; the
    weights are checked before they are saved."""
    ds = tmp_path / "zero0.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": False}}))
    cfg = tiny_config(f"deepspeed={ds}", "stages.epochs=[1]", "checkpoint.every_steps=2", "log_every=100")
    with pretraining(cfg, RunDir(tmp_path / "run")) as job:
        task, engine = job.start(1)
        # the last step's gradient: every loss of the window is finite, the weights saved at its end not
        engine.module.head.weight.register_hook(lambda g: g * float("nan") if engine.global_steps == 3 else g)
        with pytest.raises(Diverged, match="steps 0..4: non-finite weights; .*stage1-step00000002"):
            job.trainer(task, engine, 1).fit()
        engine.destroy()
    steps = [checkpoint.read_state(c)["step"] for c in checkpoint.complete_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [2]


def test_a_tolerated_skipped_step_is_logged_and_the_run_goes_on(process_group, tmp_path):
    cfg = tiny_config("stages.epochs=[1]", "log_every=1", "divergence.max_skipped_steps=1")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        engine.module.head.weight.register_hook(lambda g: g * float("nan") if engine.global_steps == 1 else g)
        assert job.trainer(task, engine, 1).fit().finished
        engine.destroy()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 0, 0]
