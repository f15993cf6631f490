"""`dbot-ds finetune`: end-to-end fine-tuning of a stage export on DeepSpeed (paper Table A2).

timm's building blocks, not copies: VisionTransformer with average-pooled patch tokens into
fc_norm + a linear head, layer-wise lr decay groups, RandAugment + random erasing transforms,
Mixup / CutMix with label smoothing and the soft-target loss. Linear warm-up then cosine, lr =
base_lr x global_batch / 256, top-1 / top-5 on the validation shards every epoch, resumable.
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
    """The stage export to fine-tune."""
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
    base_lr: float = 5e-4
    """Peak lr = base_lr x global_batch / 256 (Table A2: 0.8-2e-3 at batch 1024)."""
    min_lr: float = 1e-6
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path: float | None = None
    """None: 0.3 for ViT-H widths, else 0.2."""
    grad_clip: float = 0.0
    randaug: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
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
        return self.base_lr * self.global_batch / 256


# Keys that may change between a checkpoint and its resume; any other difference is an error.
RESUMABLE_CHANGES = ("stop_at_step", "num_workers")


def build_classifier(meta: dict, num_classes: int, drop_path: float):
    """timm's VisionTransformer (avg pool, fc_norm, head) with the export's encoder weights."""
    from timm.models.vision_transformer import VisionTransformer

    from dbot_ds.export import read_export
    from dbot_ds.export_cmd import timm_kwargs
    from dbot_ds.teacher import encoder_state

    arch = meta["encoder"]
    kwargs = {**timm_kwargs(arch), "num_classes": num_classes}
    model = VisionTransformer(**kwargs, global_pool="avg", drop_path_rate=drop_path)
    state, _ = read_export(Path(meta["_path"]))
    encoder = {k: v for k, v in encoder_state(state).items() if not k.startswith("norm.")}
    missing, unexpected = model.load_state_dict(encoder, strict=False)
    if unexpected or set(missing) - {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
        raise ConfigError(f"{meta['_path']} does not fit a timm ViT: missing {missing}, unexpected {unexpected}")
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)  # as MAE
    return model


def layer_decay_groups(model, cfg: FinetuneConfig) -> list[dict]:
    """timm's groups: lr_scale = layer_decay ** (layers above), no weight decay on 1-D and tokens."""
    from timm.optim import param_groups_layer_decay

    return param_groups_layer_decay(model, cfg.weight_decay, model.no_weight_decay(), layer_decay=cfg.layer_decay)


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
                                          interpolation="bicubic")

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
    from dbot_ds.engine import init_distributed
    from dbot_ds.export import read_meta
    from dbot_ds.metrics import LossWindow, MetricsLog
    from dbot_ds.schedule import lr_at

    out = Path(out)
    meta = {**read_meta(cfg.init), "_path": cfg.init}
    train_manifest = read_manifest(cfg.train)
    classes = len(train_manifest.classes)
    world = world_from_env()
    ds = fill_ds_config(cfg.deepspeed, global_batch=cfg.global_batch, micro_batch=cfg.micro_batch,
                        grad_clip=cfg.grad_clip, world_size=world.size)
    device = init_distributed(world)
    dtype = compute_dtype(ds)
    arch = ViTArch(**meta["encoder"])
    drop_path = cfg.drop_path if cfg.drop_path is not None else (0.3 if arch.width >= 1280 else 0.2)
    torch.manual_seed(cfg.seed)
    model = build_classifier(meta, classes, drop_path).to(device)
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
    if world.is_main:
        (out / "metrics.json").write_text(json.dumps({"best": best, "last": record}, indent=2) + "\n")
    return best


def main(args) -> int:
    from dbot_ds.distributed import world_from_env
    from dbot_ds.engine import shutdown_distributed

    data = {"init": args.init, "train": args.train, "val": args.val}
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
    p.add_argument("init", help="the stage export to fine-tune")
    p.add_argument("--train", required=True, help="labelled train manifest.json")
    p.add_argument("--val", required=True, help="labelled validation manifest.json")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", default="auto", choices=["auto", "none"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set epochs=50 --set base_lr=1e-3 --set deepspeed=vit_large")
    p.set_defaults(func=main)
