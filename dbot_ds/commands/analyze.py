"""`dbot-ds analyze`: the paper's property analyses (Sec. 7, App. C) for any ViT size and depth.

- average attention distance per layer and head: the attention-weighted distance (pixels)
  between a query patch and the patches it attends to, averaged over queries and images;
- top-k singular-value share per layer: sum of the k largest singular values of an image's
  patch-feature matrix over the sum of all of them, averaged over images;
- CorLoc: the first singular vector of the last block's patch features splits the patches into
  two sets; the smaller set's bounding box is the predicted object, correct when IoU >= 0.5 with
  a ground-truth box.
Outputs JSON and PNG plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dbot_ds.data.eval_loader import labelled_loader
from dbot_ds.data.transforms import normalize_on_device
from dbot_ds.weights.sources import load_encoder


def patch_distances(grid: int, patch: int) -> torch.Tensor:
    """[N, N] pixel distances between patch centres."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float() * patch
    return torch.cdist(pos, pos)


def mean_attention_distance(attn: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """attn [B, H, N, N] over patch tokens (rows sum to 1) -> [H] mean distance."""
    return (attn * distances).sum(-1).mean(dim=(0, 2))


def attention_maps(block, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Recompute a timm block's attention probabilities for its input x [B, T, D] -> [B, H, T, T]:
    a ViT block's, or a BEiT block's (q/v biases, plus the shared relative position bias)."""
    a = block.attn
    h = block.norm1(x)
    b, t, _ = h.shape
    if getattr(a, "q_bias", None) is not None:  # BEiT: no k bias
        qkv = F.linear(h, a.qkv.weight, torch.cat([a.q_bias, torch.zeros_like(a.q_bias), a.v_bias]))
    else:
        qkv = a.qkv(h)
    qkv = qkv.reshape(b, t, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    if hasattr(a, "q_norm"):
        q, k = a.q_norm(q), a.k_norm(k)
    logits = (q * a.scale) @ k.transpose(-2, -1)
    return (logits if bias is None else logits + bias).softmax(-1)


def singular_value_share(features: torch.Tensor, k: int) -> torch.Tensor:
    """features [B, N, D] -> [B] share of the k largest singular values."""
    s = torch.linalg.svdvals(features.float())
    return s[:, :k].sum(-1) / s.sum(-1)


def first_singular_box(features: torch.Tensor, grid: int, patch: int) -> tuple[int, int, int, int]:
    """features [N, D] (patch tokens) -> (x0, y0, x1, y1) pixel box of the smaller side of the
    split that the first left singular vector of the centred features makes."""
    u, _, _ = torch.linalg.svd(features.float() - features.float().mean(0), full_matrices=False)
    score = u[:, 0]
    fg = score > 0
    if fg.sum() > (~fg).sum():  # the object is the smaller set
        fg = ~fg
    if fg.sum() == 0:
        fg = score == score.max()
    idx = fg.nonzero().flatten()
    ys, xs = idx // grid, idx % grid
    return (int(xs.min()) * patch, int(ys.min()) * patch, (int(xs.max()) + 1) * patch, (int(ys.max()) + 1) * patch)


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@torch.no_grad()
def analyze(encoder: nn.Module, imgs: torch.Tensor, k: int = 5, boxes: list[list] | None = None) -> dict:
    """imgs: normalised [B, 3, H, W] at the encoder's size; boxes: per image, ground-truth boxes
    in the same pixel frame. -> {"attention_distance": [L][H], "singular_share": [L], "corloc"}."""
    encoder = encoder.eval()
    arch = encoder.arch
    dist = patch_distances(arch.grid, arch.patch_size).to(imgs.device)
    x = encoder.block_input(encoder.embed_patches(imgs))  # [B, 1+N, D]
    bias = encoder.rel_pos_bias() if hasattr(encoder, "rel_pos_bias") else None  # BEiT-style: shared
    att_dist, shares = [], []
    for block in encoder.blocks:
        attn = attention_maps(block, x, bias)[:, :, 1:, 1:]
        attn = attn / attn.sum(-1, keepdim=True)  # over patch keys
        att_dist.append(mean_attention_distance(attn, dist).tolist())
        x = block(x) if bias is None else block(x, shared_rel_pos_bias=bias)
        shares.append(singular_value_share(x[:, 1:], k).mean().item())
    out = {"attention_distance": att_dist, "singular_share": shares, "k": k}
    if boxes is not None:
        hits = [max((iou(first_singular_box(f, arch.grid, arch.patch_size), b) for b in gt), default=0) >= 0.5
                for f, gt in zip(x[:, 1:], boxes)]
        out["corloc"] = sum(hits) / len(hits)
    return out


def plot(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for layer, heads in enumerate(result["attention_distance"]):
        ax.scatter([layer + 1] * len(heads), heads, s=8, color="tab:blue")
    ax.set(xlabel="layer", ylabel="mean attention distance (px)", title="attention distance per head")
    fig.tight_layout()
    paths.append(out / "attention_distance.png")
    fig.savefig(paths[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(result["singular_share"]) + 1), result["singular_share"], marker="o")
    ax.set(xlabel="layer", ylabel=f"top-{result['k']} singular value share", title="singular value share")
    fig.tight_layout()
    paths.append(out / "singular_share.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close("all")
    return paths


def main(args) -> int:
    encoder = load_encoder(args.encoder)
    imgs = []
    for batch, _ in labelled_loader(args.manifest, encoder.arch.img_size, batch=64, workers=0, pipe_urls=args.pipe_urls):
        imgs.append(batch)
        if sum(map(len, imgs)) >= args.max_images:
            break
    imgs = normalize_on_device(torch.cat(imgs)[: args.max_images], torch.device("cpu"), torch.float32)
    boxes = json.loads(Path(args.boxes).read_text())[: len(imgs)] if args.boxes else None
    result = analyze(encoder, imgs, args.k, boxes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps({"encoder": args.encoder, "images": len(imgs), **result}, indent=2))
    for p in plot(result, out):
        print(f"wrote {p}")
    print(f"wrote {out / 'analysis.json'}" + (f"; CorLoc {100 * result['corloc']:.1f}%" if "corloc" in result else ""))
    return 0


def register(sub) -> None:
    p = sub.add_parser("analyze", help="attention distance, singular-value share, CorLoc (JSON + PNG)")
    p.add_argument("encoder", help="a stage export, teacher:<stage-1 export>, a weights file, or a timm model: "
                   "hf-hub:ORG/NAME, timm:MODEL_NAME, local-dir:PATH")
    p.add_argument("--manifest", required=True, help="shards of the images to analyse")
    p.add_argument("--boxes", help="JSON list (in manifest order) of per-image lists of [x0, y0, x1, y1] "
                   "boxes in the centre-cropped frame, for CorLoc")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--max-images", type=int, default=256)
    p.add_argument("--pipe-urls", action="store_true", help="allow the manifest's pipe: URLs (shell commands) to run")
    p.add_argument("--out", required=True)
    p.set_defaults(func=main)
