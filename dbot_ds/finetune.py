"""`dbot-ds finetune`: end-to-end fine-tuning of a stage export on DeepSpeed.

Named presets (`--recipe`): the authors' released fine-tuning scripts, one per size and one per
size for the CLIP recipe's BEiT-style students, and the paper's Table A2 (`*_paper`).
timm's building blocks, not copies: VisionTransformer (or, for a BEiT-style export, Beit with a
relative position bias per block and layer scale) with average-pooled patch tokens into fc_norm
+ a linear head, layer-wise lr decay groups, RandAugment + random erasing transforms, Mixup /
CutMix with label smoothing and the soft-target loss. Linear warm-up then cosine, lr = base_lr x
global_batch / 256 (or an absolute lr), top-1 / top-5 on the validation shards every epoch,
resumable.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from dbot_ds.config import ConfigError, deep_merge, from_dict, parse_set
from dbot_ds.models import ViTArch
from dbot_ds.seeding import derive_seed


@dataclasses.dataclass(kw_only=True)
class FinetuneConfig:
    init: str = ""
    """The encoder to fine-tune: a stage export, teacher:<stage-1 export> (its random teacher:
    supervised training from scratch), or a weights file."""
    train: str = ""
    """Labelled train shards (manifest.json)."""
    val: str = ""
    """Labelled validation shards (manifest.json)."""
    deepspeed: str = "vit_base"
    seed: int = 0
    epochs: int = 100
    """Table A2: 100 for ViT-B, 50 for ViT-L/H."""
    warmup_epochs: float = 5
    global_batch: int = 1024
    micro_batch: int = 128
    recipe: str = "custom"
    """The preset this config started from (`--recipe`)."""
    base_lr: float = 5e-4
    """Peak lr = base_lr x global_batch / 256 (Table A2: 0.8-2e-3 at batch 1024)."""
    lr: float | None = None
    """Absolute peak lr; overrides base_lr scaling when set (the CLIP recipe's scripts)."""
    min_lr: float = 1e-6
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float | None = None
    """None: 0.3 for ViT-H widths, else 0.2."""
    grad_clip: float = 0.0
    head_init_std: float = 0.01
    """ViT classifiers: the head's truncated-normal std (the authors' 0.01). BEiT-style ones use
    BEiT's init, normal(0.02) scaled by 0.001."""
    randaug: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    """Random erasing fills with per-pixel noise, as the authors' scripts."""
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    num_workers: int = 8
    stop_at_step: int = 0

    def __post_init__(self):
        missing = [k for k in ("init", "train", "val") if not getattr(self, k)]
        if missing:
            raise ConfigError(f"finetune needs {', '.join('--' + k for k in missing)}")

    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.global_batch / 256


# Presets over FinetuneConfig's defaults. The authors' released scripts: main branch DOWNSTREAM.md
# over main_finetune.py (batch 1024 = 32 x 32 GPUs); beit branch DOWNSTREAM.md over run.sh and
# run_finetune.py for the CLIP recipe's BEiT-style students (absolute lr at batch 1024).
FINETUNE_RECIPES: dict[str, dict] = {
    "vit_base": {"epochs": 100, "base_lr": 3e-4, "layer_decay": 0.65, "drop_path": 0.1},
    "vit_large": {"epochs": 50, "base_lr": 3e-4, "layer_decay": 0.75, "drop_path": 0.25, "grad_clip": 1.0,
                  "deepspeed": "vit_large"},
    "vit_huge": {"epochs": 50, "base_lr": 3e-4, "layer_decay": 0.75, "drop_path": 0.3, "deepspeed": "vit_huge"},
    "clip_vit_base": {"epochs": 100, "lr": 2e-4, "layer_decay": 0.65, "drop_path": 0.1, "warmup_epochs": 20},
    "clip_vit_large": {"epochs": 50, "lr": 1e-4, "layer_decay": 0.8, "drop_path": 0.2, "deepspeed": "vit_large"},
    "clip_vit_huge": {"epochs": 50, "lr": 5e-5, "layer_decay": 0.85, "drop_path": 0.3, "deepspeed": "vit_huge"},
    # The paper's Table A2: peak lr swept over {0.8, 1.2, 1.6, 2}e-3 at batch 1024 (here 2e-3:
    # base 5e-4), and {1, 2, 3, 4}e-4 for the CLIP recipe (here 2e-4); layer decay 0.75.
    "vit_base_paper": {"epochs": 100, "base_lr": 5e-4, "drop_path": 0.2},
    "vit_large_paper": {"epochs": 50, "base_lr": 5e-4, "drop_path": 0.2, "deepspeed": "vit_large"},
    "vit_huge_paper": {"epochs": 50, "base_lr": 5e-4, "drop_path": 0.3, "deepspeed": "vit_huge"},
    "clip_vit_base_paper": {"epochs": 100, "lr": 2e-4, "drop_path": 0.1},
    "clip_vit_large_paper": {"epochs": 50, "lr": 2e-4, "drop_path": 0.2, "deepspeed": "vit_large"},
    "clip_vit_huge_paper": {"epochs": 50, "lr": 2e-4, "drop_path": 0.3, "deepspeed": "vit_huge"},
}


def finetune_recipe(name: str) -> dict:
    if name not in FINETUNE_RECIPES:
        raise ConfigError(f"unknown fine-tuning recipe {name!r}; known: {', '.join(FINETUNE_RECIPES)}")
    return {**FINETUNE_RECIPES[name], "recipe": name}


# Keys that may change between a checkpoint and its resume; any other difference is an error.
RESUMABLE_CHANGES = ("stop_at_step", "num_workers")
MODEL_FILE = "model.safetensors"  # the fine-tuned classifier, written when the run ends
# BEiT's fine-tuning skip list (its VisionTransformer.no_weight_decay): the per-block relative
# position tables decay, unlike in timm's Beit.no_weight_decay.
BEIT_NO_WEIGHT_DECAY = {"pos_embed", "cls_token"}


def check_recipe_fits(cfg: FinetuneConfig, family: str, path: str) -> None:
    """The CLIP presets are for BEiT-style students, the others for MAE-style ViTs."""
    if cfg.recipe == "custom":
        return
    wants = "beit" if cfg.recipe.startswith("clip_") else "vit"
    if wants != family:
        other = "a clip_vit_* recipe" if family == "beit" else "a vit_* recipe"
        raise ConfigError(f"--recipe {cfg.recipe} fine-tunes {wants}-family students, but {path} is a "
                          f"{family}-family export: use {other}")


def build_classifier(encoder: torch.nn.Module, num_classes: int, drop_path: float, head_init_std: float = 0.01):
    """timm's classifier (avg pool, fc_norm, head) with the encoder's weights: VisionTransformer
    for an MAE-style encoder, Beit (a relative position bias per block, each starting from the
    shared one, as BEiT fine-tunes) for a BEiT-style one."""
    arch: ViTArch = encoder.arch
    if arch.pre_norm or arch.proj_dim:
        raise ConfigError("fine-tuning takes dbot-ds students and MAE-style ViTs; this encoder is a CLIP tower")
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("norm.")}
    encoder = state
    if arch.family == "beit":
        from timm.models.beit import Beit

        model = Beit(img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.width, depth=arch.depth,
                     num_heads=arch.heads, mlp_ratio=arch.mlp_ratio, num_classes=num_classes, global_pool="avg",
                     use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=arch.layer_scale,
                     drop_path_rate=drop_path, head_init_scale=0.001)
        shared = encoder.pop("rel_pos_bias.relative_position_bias_table")
        encoder.update({f"blocks.{i}.attn.relative_position_bias_table": shared.clone() for i in range(arch.depth)})
    else:
        from timm.models.vision_transformer import VisionTransformer

        from dbot_ds.export_cmd import timm_kwargs

        model = VisionTransformer(**{**timm_kwargs(arch.to_dict()), "num_classes": num_classes},
                                  global_pool="avg", drop_path_rate=drop_path)
        torch.nn.init.trunc_normal_(model.head.weight, std=head_init_std)  # the authors' main_finetune.py
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if unexpected or set(missing) - {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
        raise ConfigError(f"the encoder does not fit a timm classifier: missing {missing}, unexpected {unexpected}")
    return model


def layer_decay_groups(model, cfg: FinetuneConfig) -> list[dict]:
    """timm's groups: lr_scale = layer_decay ** (layers above), no weight decay on 1-D tensors
    and the model's tokens (BEiT's list for a Beit classifier)."""
    from timm.models.beit import Beit
    from timm.optim import param_groups_layer_decay

    skip = BEIT_NO_WEIGHT_DECAY if isinstance(model, Beit) else model.no_weight_decay()
    return param_groups_layer_decay(model, cfg.weight_decay, skip, layer_decay=cfg.layer_decay)


def seed_everything(seed: int) -> None:
    """timm's augmentations and Mixup draw from python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainSample:
    """(raw sample, rng) -> (float image [3, H, W] after timm's training transform, label)."""

    def __init__(self, size: int, cfg: FinetuneConfig):
        from timm.data import create_transform

        self.transform = create_transform(size, is_training=True, auto_augment=cfg.randaug, re_prob=cfg.reprob,
                                          re_mode=cfg.remode, interpolation="bicubic")

    def __call__(self, sample: dict, rng: random.Random):
        seed_everything(rng.getrandbits(62))  # timm's transforms draw from the global generators
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        return self.transform(img), int(sample["cls"])


@torch.no_grad()
def evaluate(eng, manifest: str, size: int, device, dtype, rank: int, world: int, workers: int) -> dict:
    from dbot_ds.data.eval_loader import labelled_loader
    from dbot_ds.data.transforms import normalize_on_device

    eng.eval()
    counts = torch.zeros(3, device=device)  # top1, top5, n
    for imgs, labels in labelled_loader(manifest, size, batch=128, workers=workers, rank=rank, world=world):
        logits = eng(normalize_on_device(imgs, device, dtype)).float()
        labels = labels.to(device, non_blocking=True)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                               torch.full((), len(labels), device=device)]).float()  # a fill, not a host copy
    if dist.is_initialized():
        dist.all_reduce(counts)
    eng.train()
    return {"top1": (counts[0] / counts[2]).item(), "top5": (counts[1] / counts[2]).item()}


def finetune(cfg: FinetuneConfig, out: str | Path, resume: str = "auto") -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from torch.utils.data import DataLoader

    from dbot_ds import checkpoint
    from dbot_ds import engine as ds_engine
    from dbot_ds.data.shard_loader import ShardStream
    from dbot_ds.data.shards import read_manifest
    from dbot_ds.distributed import world_from_env
    from dbot_ds.ds_config import compute_dtype, fill_ds_config
    from dbot_ds.encoders import load_encoder
    from dbot_ds.engine import init_distributed
    from dbot_ds.metrics import LossWindow, MetricsLog
    from dbot_ds.schedule import lr_at

    out = Path(out)
    encoder = load_encoder(cfg.init)
    train_manifest = read_manifest(cfg.train)
    classes = len(train_manifest.classes)
    world = world_from_env()
    ds = fill_ds_config(cfg.deepspeed, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                        grad_clip=cfg.grad_clip, world_size=world.size)
    device = init_distributed(world)
    dtype = compute_dtype(ds)
    arch = encoder.arch
    check_recipe_fits(cfg, arch.family, cfg.init)
    drop_path = cfg.drop_path if cfg.drop_path is not None else (0.3 if arch.width >= 1280 else 0.2)
    torch.manual_seed(cfg.seed)
    model = build_classifier(encoder, classes, drop_path, cfg.head_init_std).to(device)
    eng = ds_engine.initialize(model, ds, device, cfg.peak_lr(), cfg.betas, lambda m: layer_decay_groups(m, cfg))
    accum = ds["gradient_accumulation_steps"]
    stream = ShardStream(manifest=train_manifest, rank=world.rank, world=world.size, micro=cfg.micro_batch,
                         accum=accum, seed=cfg.seed, crop=arch.img_size, scale=(0.08, 1.0), hflip=True,
                         sample_fn=TrainSample(arch.img_size, cfg))
    loader = DataLoader(stream, batch_size=cfg.micro_batch, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0, pin_memory=device.type == "cuda")
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=classes)
    loss_fn = SoftTargetCrossEntropy()
    spe, total = stream.steps_per_epoch, stream.steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * spe)
    if world.is_main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        (out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    log = MetricsLog(out, world.is_main)
    step = 0
    ckpt = checkpoint.latest(out / "checkpoints") if resume == "auto" else None
    if ckpt:
        checkpoint.check_same_config(ckpt, dataclasses.asdict(cfg), RESUMABLE_CHANGES)
        step = checkpoint.load(eng, ckpt)["step"]
    best = record = {}
    bar = tqdm(total=total, initial=step, desc="finetune", disable=not world.is_main, dynamic_ncols=True)
    while step < total:
        epoch, in_epoch = divmod(step, spe)
        stream.set_position(epoch, in_epoch)
        window = LossWindow(device, step)  # this epoch's (rest of the) micro-batches
        for i, (imgs, labels) in enumerate(loader):
            lr = lr_at(step, total, warmup, cfg.peak_lr(), cfg.min_lr)
            ds_engine.set_lr(eng, lr)
            # mixup, cutmix and drop path: a function of (step, micro-step, rank)
            seed_everything(derive_seed(cfg.seed, "finetune", step, i % accum, world.rank))
            imgs, targets = mixup(imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            loss = loss_fn(eng(imgs.to(dtype)).float(), targets)
            eng.backward(loss)
            eng.step()
            window.add(loss.detach())
            if (i + 1) % accum:
                continue
            step += 1
            bar.update(1)
            stopping = bool(cfg.stop_at_step) and step >= cfg.stop_at_step
            if step % spe == 0 or stopping:
                metrics = evaluate(eng, cfg.val, arch.img_size, device, dtype, world.rank, world.size,
                                   min(cfg.num_workers, 2))
                record = {"epoch": step / spe, "step": step, "lr": lr,
                          "loss": window.close(step, world.size)[0], **metrics}
                log.log(record, step)
                bar.set_postfix(top1=f"{100 * metrics['top1']:.1f}")
                best = max(best, record, key=lambda r: r.get("top1", -1))
                checkpoint.save(eng, out / "checkpoints", {"stage": 0, "step": step, "zero_stage": eng.zero_optimization_stage(),
                                                           "config": dataclasses.asdict(cfg), "teacher": "finetune"},
                                is_main=world.is_main, keep=2)
            if stopping:
                bar.close()
                log.close()
                return best
    bar.close()
    log.close()
    if not record:  # the run had already finished: report what it found then
        return json.loads((out / "metrics.json").read_text())["best"]
    weights = ds_engine.full_fp32_state(eng)  # collective under ZeRO-3
    if world.is_main:
        from safetensors.torch import save

        from dbot_ds.files import atomic_write
        from dbot_ds.teacher_import import HEADS_KEY
        # timm key names: loads into the timm classifier, or as a teacher / probe encoder
        atomic_write(out / MODEL_FILE, save({k: v.contiguous() for k, v in weights.items()},
                                            metadata={"format": "pt", HEADS_KEY: str(arch.heads)}))
        (out / "metrics.json").write_text(json.dumps({"best": best, "last": record}, indent=2) + "\n")
    return best


def main(args) -> int:
    from dbot_ds.distributed import world_from_env
    from dbot_ds.engine import shutdown_distributed

    data = {**(finetune_recipe(args.recipe) if args.recipe else {}),
            "init": args.init, "train": args.train, "val": args.val}
    for item in args.set:
        data = deep_merge(data, parse_set(item))
    best = finetune(from_dict(FinetuneConfig, data), args.out, resume=args.resume)
    shutdown_distributed()  # on success only: after a failure on one rank a barrier would hang
    if world_from_env().is_main:
        print(f"best top-1 {100 * best.get('top1', 0):.2f}%, top-5 {100 * best.get('top5', 0):.2f}% "
              f"(epoch {best.get('epoch')})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="end-to-end fine-tuning of a stage export (Table A2 recipe)")
    p.add_argument("init", help="the encoder to fine-tune: a stage export, teacher:<stage-1 export>, or a weights file")
    p.add_argument("--train", required=True, help="labelled train manifest.json")
    p.add_argument("--val", required=True, help="labelled validation manifest.json")
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", help="a preset: the authors' released settings (vit_base, vit_large, vit_huge, "
                   "clip_vit_base, clip_vit_large, clip_vit_huge) or the paper's Table A2 (*_paper)")
    p.add_argument("--resume", default="auto", choices=["auto", "none"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set epochs=50 --set base_lr=1e-3 --set deepspeed=vit_large")
    p.set_defaults(func=main)
