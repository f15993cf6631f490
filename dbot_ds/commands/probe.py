"""`dbot-ds probe`: linear probe and k-NN on frozen features (the authors released neither).

Features: the encoder's final-norm output, average-pooled over patch tokens (as the paper's
fine-tuning head) or the cls token. k-NN: cosine similarity, k=20, temperature 0.07, weighted
votes (as DINO). Linear probe: BatchNorm without affine + a linear layer (as MAE), trained with
AdamW on cached features.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.config import ProbeConfig
from dbot_ds.config.schema import from_namespace
from dbot_ds.data.eval_loader import labelled_loader
from dbot_ds.data.shards import read_manifest
from dbot_ds.data.transforms import normalize_on_device
from dbot_ds.weights.sources import load_encoder


@torch.no_grad()
def extract(encoder: nn.Module, manifest: str, device, pool: str = "avg", batch: int = 256,
            workers: int = 2, pipe_urls: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """-> features [N, D] (float32, CPU), labels [N]."""
    encoder = encoder.to(device).eval()
    feats, labels = [], []
    for imgs, y in labelled_loader(manifest, encoder.arch.img_size, batch, workers, pipe_urls=pipe_urls):
        tokens = encoder(normalize_on_device(imgs, device, torch.float32))  # [B, 1+N, D]
        feats.append((tokens[:, 1:].mean(1) if pool == "avg" else tokens[:, 0]).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """DINO's weighted k-NN: top-k cosine neighbours vote with exp(sim / T)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, len(train_x))
    correct = 0
    for i in range(0, len(test_x), chunk):
        sim = test_x[i:i + chunk] @ train_x.T                       # [b, Ntrain]
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes).scatter_add_(1, train_y[idx], (top / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return correct / len(test_x)


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, epochs: int = 100,
                 lr: float = 1e-3, batch: int = 256, seed: int = 0) -> float:
    """BatchNorm (no affine) + linear head on frozen features; returns top-1 on the test set."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], num_classes))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(train_x), generator=g).split(batch):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    head.eval()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def probe(cfg: ProbeConfig) -> list[dict]:
    """k-NN and linear-probe top-1 of each encoder, one row each (printed as it is done)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = len(read_manifest(cfg.train).classes)
    rows = []
    for source in cfg.encoders:
        t = time.time()
        encoder = load_encoder(source)
        train = extract(encoder, cfg.train, device, cfg.pool, workers=cfg.workers, pipe_urls=cfg.pipe_urls)
        test = extract(encoder, cfg.val, device, cfg.pool, workers=cfg.workers, pipe_urls=cfg.pipe_urls)
        row = {"encoder": source, "knn_top1": knn_accuracy(*train, *test, k=cfg.k, temperature=cfg.temperature,
                                                           num_classes=classes),
               "linear_top1": linear_probe(*train, *test, classes, epochs=cfg.epochs),
               "seconds": round(time.time() - t, 1)}
        rows.append(row)
        print(f"{source}: k-NN {100 * row['knn_top1']:.1f}%, linear {100 * row['linear_top1']:.1f}% "
              f"({row['seconds']} s)", flush=True)
    return rows


def main(args) -> int:
    cfg = from_namespace(ProbeConfig, args)
    rows = probe(cfg)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("probe", help="linear probe and k-NN on frozen features")
    p.add_argument("encoders", nargs="+",
                   help="stage export dirs; teacher:<stage-1 export> for the random teacher stage 1 distilled "
                   "from; weights files (timm, DINO, MAE, CLIP, dbot-ds finetune's model.safetensors); or "
                   "hf-hub:ORG/NAME, timm:MODEL_NAME, local-dir:PATH (timm models; offline: HF_HUB_OFFLINE=1 "
                   "and the local Hugging Face cache)")
    p.add_argument("--train", required=True, help="labelled train manifest.json")
    p.add_argument("--val", required=True, help="labelled validation manifest.json")
    p.add_argument("--pool", choices=["avg", "cls"], default="avg")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--epochs", type=int, default=100, help="linear probe epochs on cached features")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--pipe-urls", action="store_true", help="allow the manifests' pipe: URLs (shell commands) to run")
    p.add_argument("--json")
    p.set_defaults(func=main)
