"""Watching a run: the same metrics under the same names in metrics.jsonl, TensorBoard and
Weights & Biases (offline), one W&B run across a resume, and a profiler trace of chosen steps."""

import glob
import json
import struct

import pytest
from helpers import tiny_config

from dbot_ds.commands.pretrain import pretrain

METRICS = {"loss", "lr", "grad_norm", "skipped_steps", "images_per_s", "data_wait_s"}


def wandb_history(run_file) -> list[dict]:
    """The history rows of an offline W&B run file."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]


def wandb_records(run_file) -> list:
    """The records of an offline W&B run file (LevelDB-log framing, 32 KiB blocks, 7-byte chunk
    headers, after a 7-byte file header) parsed with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, rows, pos, record = open(run_file, "rb").read(), [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4: pos + 7])
        record += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            r = pb.Record()
            r.ParseFromString(record)
            rows.append(r)
            record = b""
    return rows


def test_metrics_reach_jsonl_tensorboard_and_wandb_under_the_same_names_and_a_resume_keeps_the_wandb_run(
        process_group, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = ("log.wandb=dbot-test", "stages.epochs=[2]")
    pretrain(tiny_config(*cfg, "stop_at_step=4"), tmp_path)
    first_id = (tmp_path / "wandb_id").read_text().strip()
    pretrain(tiny_config(*cfg), tmp_path)  # the resumed run
    assert (tmp_path / "wandb_id").read_text().strip() == first_id

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert METRICS <= set(lines[0]) and [r["step"] for r in lines] == [2, 4, 6, 8]
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    assert METRICS - {"grad_norm"} <= set(tb.Tags()["scalars"])
    assert [e.value for e in tb.Scalars("loss")] == pytest.approx([r["loss"] for r in lines])

    runs = sorted(glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{first_id}" / f"run-{first_id}.wandb")))
    assert len(runs) == 2  # both jobs logged to the one W&B run
    rows = [row for run in runs for row in wandb_history(run)]
    assert METRICS - {"grad_norm"} <= set(rows[0])
    assert [row["loss"] for row in rows] == pytest.approx([r["loss"] for r in lines])


def test_a_run_that_fails_ends_as_failed_in_wandb(process_group, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from dbot_ds.runtime.trainer import Diverged

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with pytest.raises(Diverged):
        pretrain(tiny_config("log.wandb=dbot-test", "stages.epochs=[1]", "optim.lr=1e6", "optim.warmup_epochs=0"),
                 tmp_path)
    run_file, = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    exits = [r.exit.exit_code for r in wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]


def test_a_profiler_window_leaves_a_trace_per_rank_naming_the_steps_phases(process_group, tmp_path):
    pretrain(tiny_config("stages.epochs=[1]", "profile.steps=1:3"), tmp_path)
    traces = glob.glob(str(tmp_path / "profile" / "rank0*.pt.trace.json"))
    assert len(traces) == 1
    events = {e.get("name") for e in json.load(open(traces[0]))["traceEvents"]}
    assert {"dbot_ds.teacher_forward", "dbot_ds.student_forward", "dbot_ds.backward", "dbot_ds.optimizer"} <= events


def test_a_run_resumed_inside_the_profiler_window_still_traces_the_rest_of_it(process_group, tmp_path):
    pretrain(tiny_config("stages.epochs=[1]", "stop_at_step=2"), tmp_path)
    pretrain(tiny_config("stages.epochs=[1]", "profile.steps=1:4"), tmp_path)  # resumed at step 2
    assert len(glob.glob(str(tmp_path / "profile" / "rank0*.pt.trace.json"))) == 1


def test_a_profile_window_must_be_a_range_of_steps():
    from dbot_ds.config import ConfigError

    with pytest.raises(ConfigError, match="profile.steps '9:3': give A:B with 0 <= A < B"):
        tiny_config("profile.steps=9:3")
    with pytest.raises(ConfigError, match="profile.memory records the steps of profile.steps: give both"):
        tiny_config("profile.memory=true")
