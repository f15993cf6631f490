"""Teacher, breakpoint and stage behaviour on real DeepSpeed engines (gloo, CPU, fp32)."""

import json

import pytest
import torch
from helpers import tiny_config

from dbot_ds.commands.pretrain import pretrain, pretraining
from dbot_ds.method.stages import fresh_student
from dbot_ds.runtime.engine import full_fp32_state, gather
from dbot_ds.runtime.trainer import micro_step
from dbot_ds.weights.export import encoder_state, read_export
from dbot_ds.weights.rundir import RunDir


def stage_parts(job, stage):
    """A stage as the run starts it: (teacher, engine, trainer)."""
    task, eng = job.start(stage)
    return task.teacher, eng, job.trainer(task, eng, stage)


def test_teacher_gets_no_gradient_and_does_not_change_within_a_stage(process_group, tmp_path):
    with pretraining(tiny_config("stages.epochs=[1]"), RunDir(tmp_path)) as job:
        teacher, eng, trainer = stage_parts(job, 1)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        engine_params = {id(p) for p in eng.module.parameters()}
        assert not any(id(p) in engine_params for p in teacher.parameters())
        assert not any(p.requires_grad for p in teacher.parameters())

        assert trainer.fit().finished

        assert all(p.grad is None for p in teacher.parameters())
        after = teacher.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not torch.equal(eng.module.encoder.blocks[0].mlp.fc1.weight,
                               fresh_student(job.cfg, 1, 32).encoder.blocks[0].mlp.fc1.weight)  # it trained
        eng.destroy()


def test_breakpoint_teacher_is_the_old_student_bit_for_bit_and_the_optimizer_is_fresh(process_group, tmp_path):
    with pretraining(tiny_config(), RunDir(tmp_path)) as job:
        teacher1, eng1, trainer = stage_parts(job, 1)
        trainer.fit()
        student1 = full_fp32_state(eng1)
        assert len(eng1.optimizer.optimizer.state) > 0
        job.export(eng1, 1, teacher1.identity)
        eng1.destroy()

        teacher2, eng2, _ = stage_parts(job, 2)
        for k, v in teacher2.encoder.state_dict().items():
            if k != "pos_embed":
                assert torch.equal(v, student1[f"encoder.{k}"]), k
        state, meta = read_export(tmp_path / "stage1")
        assert teacher2.identity == meta["sha256"]
        assert len(eng2.optimizer.optimizer.state) == 0  # no Adam moments carried over
        reinit = fresh_student(job.cfg, 2, teacher2.arch.width).state_dict()
        for k, v in eng2.module.state_dict().items():
            assert torch.equal(v, reinit[k]), k
        eng2.destroy()


def test_lr_schedule_restarts_at_every_stage(process_group, tmp_path):
    pretrain(tiny_config(), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by_stage = {s: [(r["step"], r["lr"]) for r in records if r["stage"] == s] for s in (1, 2)}
    assert by_stage[1] == by_stage[2]
    lrs = [lr for _, lr in by_stage[1]]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs) / 4  # warm-up, then cosine towards 0


def test_student_keeps_its_weights_when_reinit_is_off(process_group, tmp_path):
    cfg = tiny_config("teacher.reinit_student=false", "stages.epochs=[1,1]", "stop_at_step=4")
    pretrain(cfg, tmp_path)
    cfg = tiny_config("teacher.reinit_student=false", "stages.epochs=[1,1]")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        _, eng, _ = stage_parts(job, 2)
        state, _ = read_export(tmp_path / "stage1")
        for k, v in full_fp32_state(eng).items():
            assert torch.equal(v, state[k]), k
        eng.destroy()


def test_ema_teacher_moves_towards_the_student(process_group, tmp_path):
    cfg = tiny_config("teacher.update=ema", "teacher.momentum=0.9", "stages.epochs=[1]")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, eng = job.start(1)
        teacher = task.teacher
        for t, s in zip(teacher.encoder.parameters(), eng.module.encoder.parameters()):
            assert torch.equal(t, s)  # starts as a copy of the student
        with torch.no_grad():
            for p in eng.module.encoder.parameters():
                p.add_(1.0)
        old = [p.clone() for p in teacher.encoder.parameters()]
        task.after_step(eng, 1, 4, gather(eng))  # what the Trainer calls after each optimizer step
        for t, o, s in zip(teacher.encoder.parameters(), old, eng.module.encoder.parameters()):
            assert torch.allclose(t, 0.9 * o + 0.1 * s)
        eng.destroy()


def test_a_teacher_whose_grid_cannot_match_is_refused_before_training(process_group, tmp_path):
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path / "donor")  # patch 8 at 32 px: 4x4
    cfg = tiny_config(f"teacher.init={tmp_path / 'donor' / 'stage1'}", "model.patch_size=2")  # 16x16
    from dbot_ds.config import ConfigError
    with pytest.raises(ConfigError, match="4x4 token grid.*16x16 grid.*128 px"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_a_pretrained_teacher_export_is_used_as_the_stage1_teacher(process_group, tmp_path):
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path / "donor")
    donor, meta = read_export(tmp_path / "donor" / "stage1")
    with pretraining(tiny_config(f"teacher.init={tmp_path / 'donor' / 'stage1'}"), RunDir(tmp_path / "run")) as job:
        teacher, eng, _ = stage_parts(job, 1)
        assert teacher.identity == meta["sha256"]
        for k, v in teacher.encoder.state_dict().items():
            assert torch.equal(v, encoder_state(donor)[k])
        eng.destroy()


def test_bf16_run_has_a_bf16_teacher_and_exports_fp32_master_weights(process_group, tmp_path):
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    with pretraining(tiny_config(f"deepspeed={ds}", "stages.epochs=[1]"), RunDir(tmp_path)) as job:
        teacher, eng, trainer = stage_parts(job, 1)
        assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
        assert all(p.dtype == torch.bfloat16 for p in eng.module.parameters())
        trainer.fit()
        job.export(eng, 1, teacher.identity)
        state, _ = read_export(tmp_path / "stage1")
        assert all(v.dtype == torch.float32 for v in state.values())
        assert state["encoder.pos_embed"].equal(fresh_student(job.cfg, 1, 32).encoder.pos_embed)
        eng.destroy()


@pytest.mark.parametrize("sets", [
    ("model.decoder=false", "loss.kind=cosine", "mask.ratio=0.4", "teacher.final_norm=true"),
    ("teacher.random_depth=0",),
], ids=["no-decoder-recipe", "depth0-random-teacher"])
def test_recipe_variants_train_across_a_breakpoint(process_group, tmp_path, sets):
    exports = pretrain(tiny_config(*sets, "stages.epochs=[1,1]"), tmp_path)
    state, meta = read_export(exports[-1])
    _, first = read_export(exports[0])
    assert meta["stage"] == 2 and meta["teacher_sha256"] == first["sha256"]
    assert (meta["decoder"] is None) == ("model.decoder=false" in sets)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_several_masks_share_one_teacher_forward(process_group, tmp_path):
    with pretraining(tiny_config("mask.per_image=3", "stages.epochs=[1]"), RunDir(tmp_path)) as job:
        task, eng = job.start(1)
        calls, seen = [], []
        task.teacher.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        eng.module.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        loss = micro_step(task, eng, torch.randn(8, 3, 32, 32))
        assert calls == [8] and seen == [24] and torch.isfinite(loss)
        eng.destroy()


def test_a_finished_run_gives_the_signals_back(process_group, tmp_path):
    import signal
    before = signal.getsignal(signal.SIGTERM)
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before
