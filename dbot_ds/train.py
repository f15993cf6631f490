"""The dBOT pre-training loop: K stages, a breakpoint between stages, resumable anywhere.

Launch (every launcher sets RANK/WORLD_SIZE/LOCAL_RANK; a bare command runs 1 process):
    dbot-ds pretrain --recipe demo --out runs/demo
    torchrun --nproc_per_node 8 -m dbot_ds.cli pretrain --recipe vit_base --out runs/b --set data.shards=M
    deepspeed --num_gpus 8 --module dbot_ds.cli pretrain --recipe vit_base --out runs/b --set data.shards=M
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dbot_ds import checkpoint, engine as ds_engine
from dbot_ds.accel import try_compile
from dbot_ds.config import ConfigError, RunConfig
from dbot_ds.data import EpochSampler, ShardStream, build_data
from dbot_ds.data.prefetch import DevicePrefetcher
from dbot_ds.distributed import World, barrier, world_from_env
from dbot_ds.ds_config import compute_dtype, resolve_ds_config, uses_bf16
from dbot_ds.export import read_export, write_export
from dbot_ds.losses import masked_distill_loss
from dbot_ds.masking import Masks, block_masking, random_masking
from dbot_ds.metrics import LossWindow, MetricsLog
from dbot_ds.schedule import ema_momentum_at, lr_at
from dbot_ds.seeding import derive_seed
from dbot_ds.stages import (StagePlan, breakpoint_teacher, ema_teacher, export_dir, export_meta,
                            initial_teacher_encoder, previous_stage_encoder, stage_student)
from dbot_ds.preemption import StopSignal
from dbot_ds.teacher import Teacher

PREEMPT_POLL_EVERY = 5  # optimizer steps between stop checks (decided one poll later)

# Keys that may change between a checkpoint and its resume; any other difference is an error.
RESUMABLE_CHANGES = ("stop_at_step", "log_every", "compile", "cuda_graph_teacher", "data.num_workers",
                     "checkpoint.every_steps", "checkpoint.keep")


@dataclasses.dataclass
class Run:
    cfg: RunConfig
    out: Path
    world: World
    device: torch.device
    ds_config: dict
    plan: StagePlan
    position: EpochSampler | ShardStream  # where the loader is in its epoch
    loader: DevicePrefetcher  # over the DataLoader
    log: MetricsLog
    stop: StopSignal
    preempted: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.ds_config)

    @property
    def ema(self) -> bool:
        return self.cfg.teacher.update != "breakpoint"


def train_micro_step(eng, teacher: Teacher, imgs: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """One micro-batch of normalised images [B, 3, H, W] on the device (DevicePrefetcher's):
    teacher targets, masked student forward, loss, backward, (optimizer) step. Returns the loss
    as a device tensor: no host synchronisation here."""
    loss = distill_loss(eng, teacher, imgs, cfg)
    eng.backward(loss)
    eng.step()
    return loss.detach()


def distill_loss(student, teacher: Teacher, imgs: torch.Tensor, cfg: RunConfig,
                 masks: Masks | None = None) -> torch.Tensor:
    """The masked distillation loss of one micro-batch of normalised images [B, 3, H, W]; masks
    are drawn here unless given."""
    target = teacher.targets(imgs)                                 # [B, 1+N, Dt]
    if cfg.mask.per_image > 1:  # one teacher forward, K masked views of each image
        imgs = imgs.repeat_interleave(cfg.mask.per_image, dim=0)  # [B*K, 3, H, W]
        target = target.repeat_interleave(cfg.mask.per_image, dim=0)
    if masks is None:
        masks = draw_masks(cfg, imgs.shape[0], imgs.device)
    pred = student(imgs, masks)                                    # [B, 1+N, Dt]
    return masked_distill_loss(pred, target, masks.mask, kind=cfg.loss.kind, beta=cfg.loss.beta,
                               tokens=cfg.loss.tokens)


def draw_masks(cfg: RunConfig, batch: int, device: torch.device) -> Masks:
    """This micro-step's masks, from the generators seeded for it: random masking on the device,
    or BEiT block masking from a python RNG seeded by the (CPU) torch generator."""
    arch = cfg.model.encoder_arch()
    if cfg.mask.kind == "block":
        rng = random.Random(int(torch.randint(2**62, ())))
        return block_masking(batch, arch.grid, cfg.mask.num_masked(arch.num_patches), rng, device=device,
                             min_block=cfg.mask.block_min, min_aspect=cfg.mask.block_aspect)
    return random_masking(batch, arch.num_patches, cfg.mask.ratio, device=device)


def setup(cfg: RunConfig, out: Path) -> Run:
    world = world_from_env()
    ds_config = resolve_ds_config(cfg, world.size)  # batch arithmetic and JSON conflicts fail here
    device = ds_engine.init_distributed(world)
    if world.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    loader, position = build_data(cfg, rank=world.rank, world=world.size, run_dir=out,
                                  accum=ds_config["gradient_accumulation_steps"])
    plan = StagePlan(tuple(cfg.stages.epochs), position.steps_per_epoch)
    loader = DevicePrefetcher(loader, device, compute_dtype(ds_config), cfg.model.img_size)
    return Run(cfg, out, world, device, ds_config, plan, position, loader, MetricsLog(out, world.is_main),
               StopSignal(device))


def find_resume(run: Run, resume: str, only_stage: int | None = None) -> Path | None:
    if resume == "none":
        return None
    root = run.out / "checkpoints"
    if resume != "auto":
        ckpt = Path(resume)
    elif only_stage is None:
        ckpt = checkpoint.latest(root)
    else:  # a single-stage job resumes only from its own stage's checkpoints
        own = checkpoint.stage_checkpoints(root, only_stage)
        ckpt = own[-1] if own else None
    if ckpt is not None:
        checkpoint.check_same_config(ckpt, run.cfg.to_dict(), RESUMABLE_CHANGES)
    return ckpt


def start_stage(run: Run, stage: int, checked_teacher=None):
    """The teacher and a fresh engine (new student, new optimizer) for `stage`."""
    cfg = run.cfg
    teacher = None
    if not run.ema:
        teacher = breakpoint_teacher(cfg, run.out, stage, run.dtype, checked_teacher).to(run.device)
    width = teacher.target_width if teacher else cfg.model.encoder_arch().width
    student = stage_student(cfg, run.out, stage, width)
    if not ds_engine.replicas_identical(student):
        raise RuntimeError(f"stage {stage}: the re-initialised student differs between ranks")
    if run.ema:
        teacher = ema_teacher(cfg, student, uses_bf16(run.ds_config)).to(run.device)
    eng = ds_engine.build_engine(student, cfg, run.ds_config, run.device)
    fast_paths(cfg, teacher, eng.module, run.device, run.dtype)
    return teacher, eng


def fast_paths(cfg: RunConfig, teacher: Teacher, student: nn.Module, device: torch.device,
               dtype: torch.dtype) -> None:
    """torch.compile student and teacher in place when cfg.compile names a backend (warmed up at
    the training batch shapes); then the teacher's CUDA graphs when cfg.cuda_graph_teacher
    (captured at its first call)."""
    if cfg.compile:
        micro, size = cfg.batch.micro_batch, teacher.arch.img_size
        with torch.inference_mode():
            try_compile(teacher.encoder, cfg.compile, torch.zeros(micro, 3, size, size, device=device, dtype=teacher.dtype))
        compile_student(cfg, student, device, dtype)
    if cfg.cuda_graph_teacher:
        teacher.use_cuda_graphs()


def compile_student(cfg: RunConfig, student: nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    n = cfg.batch.micro_batch * cfg.mask.per_image
    imgs = torch.zeros(n, 3, cfg.model.img_size, cfg.model.img_size, device=device, dtype=dtype)
    masks = draw_masks(cfg, n, device)
    return try_compile(student, cfg.compile, imgs, masks, grad=True)  # warmed up as it trains


def save_checkpoint(run: Run, eng, teacher: Teacher, stage: int, step: int) -> None:
    # The data position and every random draw are functions of (seed, stage, step): the epoch
    # order of (seed, epoch), crops of (seed, epoch, index), masks and drop path of (seed, stage,
    # step, micro-step, rank). Storing the step restores them.
    state = {"stage": stage, "step": step, "global_step": run.plan.global_step(stage, step),
             "teacher": teacher.identity, "world_size": run.world.size,
             "zero_stage": eng.zero_optimization_stage(), "config": run.cfg.to_dict()}
    checkpoint.save(eng, run.out / "checkpoints", state, is_main=run.world.is_main,
                    keep=run.cfg.checkpoint.keep,
                    teacher_state=teacher.encoder.state_dict() if run.ema else None)


def resume_stage(run: Run, eng, teacher: Teacher, ckpt: Path) -> int:
    state = checkpoint.load(eng, ckpt)
    if run.ema:
        teacher.encoder.load_state_dict(checkpoint.load_teacher_state(ckpt))
    elif state["teacher"] != teacher.identity:
        raise RuntimeError(
            f"{ckpt} was trained against teacher {state['teacher']}, but stage {state['stage']}'s "
            f"teacher is now {teacher.identity}: the stage {state['stage'] - 1} export changed "
            "since; restore it, or start a new run")
    return state["step"]


def export_stage(run: Run, eng, teacher: Teacher, stage: int) -> Path:
    state = ds_engine.full_fp32_state(eng)  # collective under ZeRO-3
    state.update(eng.module.fixed_buffers())
    path = export_dir(run.out, stage)
    if run.world.is_main:
        write_export(path, state, export_meta(
            run.cfg, stage=stage, steps=run.plan.steps(stage), teacher_sha256=teacher.identity,
            target_width=eng.module.head.out_features, epochs=run.plan.epochs[stage - 1]))
    barrier()
    return path


def should_save(run: Run, step: int, total: int, stopping: bool) -> bool:
    every = run.cfg.checkpoint.every_steps or run.plan.steps_per_epoch
    return stopping or step == total or step % every == 0


def stop_requested(run: Run, stage: int, step: int) -> bool:
    return bool(run.cfg.stop_at_step) and run.plan.global_step(stage, step) >= run.cfg.stop_at_step


def train_stage(run: Run, eng, teacher: Teacher, stage: int, step: int) -> int:
    """Train `stage` from optimizer step `step` to its end, or until stop_at_step; returns the step."""
    cfg, plan, world = run.cfg, run.plan, run.world
    total, spe = plan.steps(stage), plan.steps_per_epoch
    accum = run.ds_config["gradient_accumulation_steps"]
    warmup, peak = round(cfg.optim.warmup_epochs * spe), cfg.peak_lr()
    window = LossWindow(run.device, step)
    bar = tqdm(total=total, initial=step, desc=f"stage {stage}/{plan.num_stages}",
               disable=not world.is_main, dynamic_ncols=True)
    while step < total:
        epoch, in_epoch = divmod(step, spe)
        run.position.set_position(epoch, in_epoch)
        for i, imgs in enumerate(run.loader):
            lr = lr_at(step, total, warmup, peak, cfg.optim.min_lr)
            ds_engine.set_lr(eng, lr)
            torch.manual_seed(derive_seed(cfg.seed, "step", stage, step, i % accum, world.rank))
            window.add(train_micro_step(eng, teacher, imgs, cfg))
            if (i + 1) % accum:
                continue
            step += 1
            if run.ema:
                ds_engine.ema_update(teacher.encoder, eng, ema_momentum_at(
                    step, total, cfg.teacher.momentum, cfg.teacher.update == "ema_cosine"))
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                log_metrics(run, bar, stage, step, window, lr)
            if step % PREEMPT_POLL_EVERY == 0 and run.stop.poll():
                run.preempted = True
            stopping = run.preempted or stop_requested(run, stage, step)
            if should_save(run, step, total, stopping):
                save_checkpoint(run, eng, teacher, stage, step)
            if stopping:
                bar.close()
                if run.preempted and world.is_main:
                    print(f"preempted: checkpoint saved at stage {stage} step {step}", flush=True)
                return step
    bar.close()
    return step


def log_metrics(run: Run, bar, stage: int, step: int, window: LossWindow, lr: float) -> None:
    loss, steps_per_s = window.close(step, run.world.size)
    record = {"stage": stage, "epoch": step / run.plan.steps_per_epoch, "step": step,
              "global_step": run.plan.global_step(stage, step), "loss": loss, "lr": lr,
              "images_per_s": steps_per_s * run.cfg.batch.global_batch}
    run.log.log(record, record["global_step"])
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")


def check_stage_start(cfg: RunConfig, out: Path, stage: int):
    """For a single-stage job: (the finished export, None) if the stage is already done; else
    (None, its teacher's (encoder, identity)), read and checked before anything starts."""
    if not 1 <= stage <= len(cfg.stages.epochs):
        raise ConfigError(f"--stage {stage}: the run has stages 1..{len(cfg.stages.epochs)}")
    done = export_dir(out, stage)
    if (done / "meta.json").is_file():
        read_export(done)  # verifies the sha256
        return done, None
    if stage == 1 or cfg.teacher.update != "breakpoint":
        return None, None  # read in pretrain (stage 1) or built from the student (EMA)
    return None, previous_stage_encoder(cfg, out, stage)


def pretrain(cfg: RunConfig, out: str | Path, resume: str = "auto", only_stage: int | None = None) -> list[Path]:
    """Run (or continue) every stage, or only `only_stage` (one Slurm job per stage); returns
    the stage exports written so far."""
    out = Path(out)
    checked = {}  # stage -> its teacher's (encoder, identity), read and checked before any step
    if only_stage is not None:
        done, checked[only_stage] = check_stage_start(cfg, out, only_stage)
        if done:
            return [done]
    run = setup(cfg, out)
    ckpt = find_resume(run, resume, only_stage)
    first = checkpoint.read_state(ckpt)["stage"] if ckpt else (only_stage or 1)
    last = only_stage or run.plan.num_stages
    if first == 1 and not run.ema:  # a pretrained teacher is read here (a random one from the seed)
        checked[1] = initial_teacher_encoder(cfg, verbose=run.world.is_main)
    exports = [] if only_stage else [export_dir(out, s) for s in range(1, first)]
    for stage in range(first, last + 1):
        teacher, eng = start_stage(run, stage, checked.get(stage))
        step = resume_stage(run, eng, teacher, ckpt) if ckpt and stage == first else 0
        step = train_stage(run, eng, teacher, stage, step)
        if step == run.plan.steps(stage):
            exports.append(export_stage(run, eng, teacher, stage))
        eng.destroy()
        if run.preempted or stop_requested(run, stage, step):
            break
    run.log.close()
    run.stop.close()
    return exports
