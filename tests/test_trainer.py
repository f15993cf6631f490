"""The seams of the one training loop: the resumable loader, the Trainer, the tasks and the
teacher policies (real DeepSpeed engines, gloo, CPU, fp32; real generated images)."""

import json

import pytest
import torch
from helpers import tiny_config

from dbot_ds.commands.pretrain import pretrain, pretraining
from dbot_ds.config import ConfigError, load_finetune
from dbot_ds.data.loader import pretrain_loader
from dbot_ds.method.policies import BreakpointPolicy, EmaPolicy, momentum_at
from dbot_ds.method.tasks import ClassifyTask, DistillTask, draw_masks, distill_loss
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime.preemption import STOP_FILE_ENV
from dbot_ds.seeding import derive_seed, seed_everything
from dbot_ds.weights.rundir import RunDir

CPU = torch.device("cpu")


# ---------------------------------------------------------------- the loader

def test_the_loader_resumed_at_any_step_yields_the_rest_of_an_uninterrupted_pass():
    cfg = tiny_config("batch.global_batch=16", "batch.micro_batch=8")  # 4 steps an epoch, 2 micro-batches each
    loader = pretrain_loader(cfg, rank=0, world=1, accum=2, device=CPU, dtype=torch.float32)
    assert loader.steps_per_epoch == 4
    full = list(loader.batches(0, 7))  # into the second epoch
    assert [(s, m) for s, m, _ in full] == [(s, m) for s in range(7) for m in (0, 1)]
    for start in (3, 5):  # mid-epoch, and mid-way through the next one
        rest = list(loader.batches(start, 7))
        assert [(s, m) for s, m, _ in rest] == [(s, m) for s, m, _ in full[2 * start:]]
        assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(rest, full[2 * start:]))


def test_the_loader_hands_out_normalised_images_in_the_compute_dtype():
    cfg = tiny_config()
    loader = pretrain_loader(cfg, rank=0, world=1, accum=2, device=CPU, dtype=torch.bfloat16)
    _, _, imgs = next(iter(loader.batches(0, 1)))
    assert imgs.shape == (8, 3, 32, 32) and imgs.dtype == torch.bfloat16
    assert -3 < imgs.float().mean() < 3 and imgs.float().min() < 0  # mean/std normalised, not 0..255


# ---------------------------------------------------------------- the Trainer

def test_the_trainer_checkpoints_on_its_cadence_and_stops_at_stop_at_step(process_group, tmp_path):
    cfg = tiny_config("stages.epochs=[2]", "checkpoint.every_steps=3", "checkpoint.keep=10", "stop_at_step=7")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        outcome = job.trainer(task, engine, 1).fit()
        engine.destroy()
    assert (outcome.step, outcome.finished, outcome.preempted, outcome.stopped) == (7, False, False, True)
    assert not outcome.go_on
    steps = [checkpoint.read_state(c)["step"] for c in checkpoint.complete_checkpoints(tmp_path / "checkpoints")]
    assert steps == [3, 6, 7]  # every 3 steps (in place of every epoch end), and the stop


def test_a_stop_request_is_obeyed_at_the_next_poll_with_a_checkpoint(process_group, tmp_path, monkeypatch, capsys):
    stop = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    cfg = tiny_config("stages.epochs=[3]")
    with pretraining(cfg, RunDir(tmp_path / "run")) as job:
        task, engine = job.start(1)
        stop.touch()  # as Slurm's USR1 trap does
        outcome = job.trainer(task, engine, 1).fit()
        engine.destroy()
    assert (outcome.step, outcome.finished, outcome.preempted) == (5, False, True)  # polled every 5 steps
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "run" / "checkpoints"))["step"] == 5
    assert "preempted: checkpoint saved at stage 1 step 5" in capsys.readouterr().out


def test_the_trainer_logs_the_schedule_it_follows(process_group, tmp_path):
    cfg = tiny_config("stages.epochs=[3]", "log_every=1", "optim.warmup_epochs=1")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        job.trainer(task, engine, 1).fit()
        engine.destroy()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    lrs = [r["lr"] for r in records]  # the lr of each step: linear warm-up over 4 steps, then cosine
    peak = cfg.peak_lr()
    assert lrs[:4] == pytest.approx([0, peak / 4, peak / 2, 3 * peak / 4])
    assert lrs[4] == pytest.approx(peak) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))


# ---------------------------------------------------------------- the tasks

def test_the_distill_task_computes_the_distillation_loss_of_the_seeded_masks(process_group, tmp_path):
    cfg = tiny_config("stages.epochs=[1]")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        imgs = torch.randn(8, 3, 32, 32)
        seed_everything(derive_seed(0, "x"))
        loss = task.loss(engine, imgs)
        seed_everything(derive_seed(0, "x"))
        masks = draw_masks(cfg, 8, CPU)
        assert torch.equal(loss, distill_loss(engine.module, task.teacher, imgs, cfg, masks))
        assert isinstance(task, DistillTask) and task.evaluate(engine) is None
        engine.destroy()


class Fixed(torch.nn.Module):
    """A classifier whose logits are its input's first pixel row (for known answers)."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, imgs):
        return imgs[:, 0, 0, :]  # [B, W] = [B, classes]


def classify_task(*sets, batches=(), reduced=None):
    cfg = load_finetune(None, None, list(sets), init="x", data={"train": "t", "val": "v"})
    reduce = (lambda t: reduced.append(t.clone())) if reduced is not None else (lambda t: None)
    return ClassifyTask(cfg, 6, lambda: iter(batches), reduce)


def test_the_classify_task_evaluates_top1_and_top5_over_every_rank():
    logits = torch.tensor([[9., 8, 7, 6, 5, 0], [0, 1, 2, 3, 4, 9], [9., 8, 7, 6, 5, 0]])  # 6 classes
    imgs = logits.view(3, 1, 1, 6).expand(3, 3, 1, 6).contiguous()
    labels = torch.tensor([0, 0, 5])  # top-1 hit; top-5 miss (0 scores lowest); top-5 miss
    reduced = []
    task = classify_task(batches=[(imgs, labels)], reduced=reduced)
    assert task.evaluate(Fixed()) == {"top1": pytest.approx(1 / 3), "top5": pytest.approx(1 / 3)}
    assert torch.equal(reduced[0], torch.tensor([1., 1., 3.]))  # summed over ranks before dividing


def test_the_classify_task_mixes_with_soft_targets_or_trains_on_hard_labels_when_mixing_is_off():
    imgs, labels = torch.randn(4, 3, 1, 6), torch.tensor([0, 1, 2, 3])
    mixing = classify_task()
    assert mixing.mixup is not None
    off = classify_task("augment.mixup=0", "augment.cutmix=0", "augment.smoothing=0")
    assert off.mixup is None
    expected = torch.nn.functional.cross_entropy(imgs[:, 0, 0, :], labels)
    assert torch.allclose(off.loss(Fixed(), (imgs, labels)), expected)


# ---------------------------------------------------------------- the teacher policies

def test_cosine_momentum_rises_from_its_start_to_one():
    assert momentum_at(0, 100, 0.996, cosine=True) == pytest.approx(0.996)
    assert momentum_at(50, 100, 0.996, cosine=True) == pytest.approx(0.998)
    assert momentum_at(100, 100, 0.996, cosine=True) == pytest.approx(1.0)
    assert momentum_at(50, 100, 0.9998, cosine=False) == 0.9998


def test_a_breakpoint_teacher_refuses_a_checkpoint_trained_against_another(process_group, tmp_path):
    cfg = tiny_config("stages.epochs=[1]")
    with pretraining(cfg, RunDir(tmp_path)) as job:
        task, engine = job.start(1)
        assert isinstance(job.policy, BreakpointPolicy)
        assert job.policy.state(task.teacher) == {"teacher": task.teacher.identity}
        with pytest.raises(ConfigError, match="was trained against teacher abc"):
            job.policy.restore(task.teacher, {"teacher": "abc", "stage": 2}, {})
        engine.destroy()


def test_an_ema_teachers_weights_are_kept_with_the_checkpoint_and_restored_from_it(process_group, tmp_path):
    cfg = tiny_config("teacher.update=ema", "stages.epochs=[1]")
    with pretraining(cfg, RunDir(tmp_path / "run")) as job:
        task, engine = job.start(1)
        assert isinstance(job.policy, EmaPolicy)
        with torch.no_grad():
            for p in task.teacher.encoder.parameters():
                p.add_(0.5)
        saved = {k: v.clone() for k, v in task.teacher.encoder.state_dict().items()}
        kept = job.policy.tensors(task.teacher)  # what a checkpoint keeps beside DeepSpeed's files
        fresh, other = job.start(1)  # a new teacher: the student's copy again
        assert not torch.equal(fresh.teacher.encoder.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
        job.policy.restore(fresh.teacher, {"teacher": "ema"}, kept)
        assert all(torch.equal(v, saved[k]) for k, v in fresh.teacher.encoder.state_dict().items())
        engine.destroy()
        other.destroy()


def test_generated_data_resumed_on_another_number_of_ranks_reads_exactly_its_unseen_samples():
    from dbot_ds.data.sampler import EpochSampler

    def from_step(world, micro, accum, step):  # global batch 8 in every layout
        keys = []
        for rank in range(world):
            sampler = EpochSampler(96, rank=rank, world=world, micro=micro, accum=accum, seed=0)
            sampler.set_position(1, step)
            keys += list(sampler)
        return sorted(keys)

    rest = from_step(2, 4, 1, 3)
    assert rest == from_step(1, 4, 2, 3) == from_step(4, 2, 1, 3)
    assert len(rest) == (96 // 8 - 3) * 8
    seen = set(from_step(1, 4, 2, 0)) - set(rest)  # what the first 3 steps read
    assert len(seen) == 3 * 8 and sorted(seen | set(rest)) == [(1, i) for i in range(96)]


def test_a_resume_with_other_loader_workers_records_the_earlier_layout_of_the_epoch(process_group, tmp_path):
    """Shards read by 2 workers for one step of epoch 1, then by 1: the checkpoints of the rest of
    the epoch name the earlier layout (so no sample of it is read twice), the next epoch's none."""
    shards = ("data.source=generated_shards", "stages.epochs=[2]", "checkpoint.every_steps=1")
    pretrain(tiny_config(*shards, "data.num_workers=2", "stop_at_step=5"), tmp_path)
    pretrain(tiny_config(*shards, "data.num_workers=0"), tmp_path)
    states = {checkpoint.read_state(c)["step"]: checkpoint.read_state(c)
              for c in checkpoint.complete_checkpoints(tmp_path / "checkpoints")}
    assert states[7]["layouts"] == [[1, 2, 1]] and states[7]["num_workers"] == 1  # epoch 1: steps 4..7
    assert states[8]["layouts"] == []


def test_a_fresh_run_in_a_used_directory_sets_the_earlier_run_aside_and_never_resumes_it(process_group, tmp_path):
    pretrain(tiny_config("stages.epochs=[1]"), tmp_path)
    first_export = json.loads((tmp_path / "stage1" / "meta.json").read_text())["sha256"]
    again = tiny_config("stages.epochs=[1]", "optim.base_lr=3e-4", "checkpoint.every_steps=1")
    pretrain(again, tmp_path, resume="none")
    # its own checkpoints only (keep=2 prunes among them), its own export where the old one was
    assert [c.name for c in checkpoint.complete_checkpoints(tmp_path / "checkpoints")] == \
        ["stage1-step00000003", "stage1-step00000004"]
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "checkpoints"))["config"]["optim"]["base_lr"] == 3e-4
    assert json.loads((tmp_path / "stage1" / "meta.json").read_text())["sha256"] != first_export
    earlier = tmp_path / "earlier" / "1"  # everything of the first run, under its own names
    assert json.loads((earlier / "stage1" / "meta.json").read_text())["sha256"] == first_export
    assert [c.name for c in checkpoint.complete_checkpoints(earlier / "checkpoints")] == ["stage1-step00000004"]
    assert {"config.json", "ds_config.json", "metrics.jsonl", "tb"} <= {p.name for p in earlier.iterdir()}
