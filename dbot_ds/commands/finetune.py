"""`dbot-ds finetune`: end-to-end fine-tuning of an encoder into timm's classifier, through the
same Trainer as pre-training (a ClassifyTask in place of the DistillTask).

The encoder: a stage export, `teacher:<stage-1 export>` (its random teacher: supervised training
from scratch) or a weights file. Presets (`--recipe`, config/recipes.py): the authors' released
scripts, and the paper's Table A2 (`*_paper`). Evaluated on the validation shards at every
epoch's end; checkpointed every checkpoint.every_steps steps (default: every epoch) and on a stop
signal, so a Slurm job requeues and resumes it (`dbot-ds slurm finetune`). When it ends:
<run>/model.safetensors (timm key names) and <run>/metrics.json (best and last evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dbot_ds.config import FinetuneConfig, load_finetune, paper_drop_path
from dbot_ds.data.loader import classify_loader, labelled_batches
from dbot_ds.data.shards import read_manifest
from dbot_ds.files import atomic_write
from dbot_ds.method.classifier import build_classifier, check_recipe_fits, layer_decay_groups
from dbot_ds.method.stages import StagePlan
from dbot_ds.method.tasks import ClassifyTask
from dbot_ds.runtime import checkpoint
from dbot_ds.runtime import engine as ds_engine
from dbot_ds.runtime.distributed import all_reduce_sum, world_from_env
from dbot_ds.runtime.session import start_session
from dbot_ds.runtime.trainer import Trainer, find_resume
from dbot_ds.seeding import derive_seed
from dbot_ds.weights.layouts import write_timm_weights
from dbot_ds.weights.rundir import RunDir
from dbot_ds.weights.sources import load_encoder


def classifier(cfg: FinetuneConfig, encoder: torch.nn.Module, num_classes: int) -> torch.nn.Module:
    """The classifier around the encoder, its head drawn from the run's seed alone."""
    drop_path = cfg.model.drop_path if cfg.model.drop_path is not None else paper_drop_path(encoder.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "classifier"))
        model = build_classifier(encoder, num_classes, drop_path, cfg.model.head_init_std)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


def evaluations(run: RunDir) -> dict:
    """{"best": the evaluation with the highest top-1, "last": the latest}, from metrics.jsonl
    (a step logged twice, before and after a crash, counts once: its last record)."""
    by_step = {}
    if run.metrics.is_file():
        for line in run.metrics.read_text().splitlines():
            record = json.loads(line)
            if "top1" in record:
                by_step[record["step"]] = record
    records = [by_step[k] for k in sorted(by_step)]
    return {"best": max(records, key=lambda r: r["top1"], default={}), "last": records[-1] if records else {}}


def finetune(cfg: FinetuneConfig, out: str | Path, resume: str = "auto") -> dict:
    """Fine-tune (or continue fine-tuning) into `out`; returns the best evaluation so far."""
    run = RunDir(out)
    encoder = load_encoder(cfg.init)  # read and checked before any process group or engine
    check_recipe_fits(cfg, encoder.arch, cfg.init)
    num_classes = len(read_manifest(cfg.data.train).classes)
    read_manifest(cfg.data.val)
    size = encoder.arch.img_size
    ckpt = find_resume(run, resume, cfg)  # a changed config is refused before anything is written
    with start_session(cfg, run, fresh=ckpt is None) as s:
        w = s.world
        loader = classify_loader(cfg, size=size, rank=w.rank, world=w.size, accum=s.accum, device=s.device,
                                 dtype=torch.float32)  # mixed in fp32, cast by the task
        plan = StagePlan((cfg.epochs,), loader.steps_per_epoch)
        if ckpt and checkpoint.read_state(ckpt)["step"] == plan.steps(1) and run.summary.is_file():
            return json.loads(run.summary.read_text())["best"]  # finished already: what it found then
        model = classifier(cfg, encoder, num_classes)
        engine = ds_engine.build_engine(model, cfg, checkpoint.resume_ds_config(s.ds_config, ckpt, w.size), s.device,
                                        groups=lambda m: layer_decay_groups(m, cfg.optim.weight_decay,
                                                                            cfg.optim.layer_decay))
        val = lambda: labelled_batches(cfg.data.val, size=size, rank=w.rank, world=w.size,  # noqa: E731
                                       workers=min(cfg.data.num_workers, 2), device=s.device, dtype=s.dtype,
                                       pipe_urls=cfg.data.pipe_urls)
        trainer = Trainer(ClassifyTask(cfg, num_classes, val, all_reduce_sum, s.dtype), engine, loader, cfg=cfg,
                          run=run, session=s, plan=plan)
        outcome = trainer.fit(trainer.resume(ckpt) if ckpt else 0)
        if outcome.finished:
            weights = ds_engine.full_fp32_state(engine)  # collective under ZeRO-3
        engine.destroy()
    found = evaluations(run) if w.is_main else {"best": {}}
    if outcome.finished and w.is_main:
        write_timm_weights(run.model, weights, encoder.arch.heads)
        atomic_write(run.summary, json.dumps(found, indent=2) + "\n")
    return found["best"]


def main(args) -> int:
    cfg = load_finetune(args.recipe, args.config, args.set, init=args.init,
                        data={k: v for k, v in (("train", args.train), ("val", args.val)) if v})
    best = finetune(cfg, args.out, resume=args.resume)
    ds_engine.shutdown_distributed()  # on success only: after a failure on one rank a barrier would hang
    if world_from_env().is_main:
        print(f"best top-1 {100 * best.get('top1', 0):.2f}%, top-5 {100 * best.get('top5', 0):.2f}% "
              f"(epoch {best.get('epoch')})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="end-to-end fine-tuning of an encoder (resumable, preemptible)")
    p.add_argument("init", help="the encoder to fine-tune: a stage export, teacher:<stage-1 export>, a weights "
                   "file, or a timm model: hf-hub:ORG/NAME, timm:MODEL_NAME, local-dir:PATH")
    p.add_argument("--train", help="labelled train manifest.json (data.train)")
    p.add_argument("--val", help="labelled validation manifest.json (data.val)")
    p.add_argument("--out", required=True, help="run directory (classifier, checkpoints, logs)")
    p.add_argument("--recipe", help="a preset: the authors' released settings (vit_base, vit_large, vit_huge, "
                   "clip_vit_base, clip_vit_large, clip_vit_huge) or the paper's Table A2 (*_paper)")
    p.add_argument("--config", help="a JSON fine-tuning config, applied over the preset")
    p.add_argument("--resume", default="auto",
                   help="auto: newest complete checkpoint in --out (default); none; or a checkpoint dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set epochs=50 --set optim.base_lr=1e-3 --set deepspeed=vit_large")
    p.set_defaults(func=main)
