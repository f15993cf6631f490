"""Teachers from local weight files, in the layouts people have on disk.

- timm state dicts of ViTs (DeiT, DINO, MAE, CLIP ViTs such as vit_base_patch16_clip_224);
- the original DINO and MAE releases (timm key names inside `teacher` / `model` wrappers, with
  `module.` / `backbone.` prefixes);
- OpenAI CLIP and open_clip checkpoints (the `visual.*` tower).
Files are data: safetensors, or torch.load(weights_only=True). The architecture (width, depth,
patch, grid, pre-norm, patch bias) comes from the weights; heads from the width (ViT convention).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from dbot_ds.export import ExportError
from dbot_ds.models import ViT, ViTArch

HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
WRAPPERS = ("teacher", "model", "state_dict", "module", "target_encoder")
PREFIXES = ("module.", "backbone.", "visual.trunk.", "encoder.")
IGNORED = re.compile(r"^(head|head_dist|fc_norm|dist_token|pre_logits|decoder|mask_token|proj$|"
                     r"text|transformer\.|token_embedding|positional_embedding$|ln_final|logit_scale|"
                     r"attn_pool|visual\.proj$|visual\.head)")
OPENAI = [  # OpenAI CLIP visual tower -> timm VisionTransformer
    (r"visual\.conv1\.weight", "patch_embed.proj.weight"),
    (r"visual\.class_embedding", "cls_token"),
    (r"visual\.positional_embedding", "pos_embed"),
    (r"visual\.ln_pre\.", "norm_pre."),
    (r"visual\.ln_post\.", "norm."),
    (r"visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", r"blocks.\1.attn.qkv.weight"),
    (r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_bias", r"blocks.\1.attn.qkv.bias"),
    (r"visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
    (r"visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.fc2."),
]


def read_weights(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"teacher weights {path} not found (a dbot-ds export dir or a weights file)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not loadable as weights only ({type(e).__name__}: {e}); "
                          "convert it to safetensors or a plain state dict") from e


def unwrap(sd: dict) -> dict:
    for key in WRAPPERS:
        if key in sd and isinstance(sd[key], dict):
            return unwrap(sd[key])
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def to_timm(sd: dict) -> tuple[dict, str, list[str], list[str]]:
    """-> (timm-layout state, layout name, renamed keys, ignored keys)."""
    if any(k.startswith("visual.transformer.resblocks") for k in sd):
        mapped, renamed, ignored = {}, [], []
        for k, v in sd.items():
            for pat, rep in OPENAI:
                if re.fullmatch(pat + r"(.*)", k):
                    new = re.sub("^" + pat, rep, k)
                    if new == "cls_token":
                        v = v.reshape(1, 1, -1)
                    elif new == "pos_embed":
                        v = v.unsqueeze(0)
                    mapped[new] = v
                    renamed.append(k)
                    break
            else:
                ignored.append(k)
        return mapped, "openai_clip", renamed, ignored
    if "patch_embed.proj.weight" not in sd:
        raise ExportError("unrecognised teacher layout: no patch_embed.proj.weight (timm, DINO, MAE) and "
                          "no visual.transformer.resblocks (OpenAI CLIP / open_clip)")
    keep = {k: v for k, v in sd.items() if not IGNORED.match(k)}
    return keep, "timm", [], sorted(set(sd) - set(keep))


def infer_arch(sd: dict, layout: str, heads: int | None = None) -> ViTArch:
    w = sd["patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    tokens = sd["pos_embed"].shape[1] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ExportError(f"pos_embed has {tokens} patch positions (+cls): not a square grid")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    return ViTArch(width=width, depth=depth, heads=heads or HEADS_BY_WIDTH.get(width, max(1, width // 64)),
                   patch_size=patch, img_size=grid * patch, mlp_ratio=mlp_ratio,
                   pre_norm="norm_pre.weight" in sd, patch_bias="patch_embed.proj.bias" in sd,
                   act="quick_gelu" if layout == "openai_clip" else "gelu")


def import_teacher(path: str | Path, heads: int | None = None) -> tuple[ViT, dict]:
    """Build a ViT from a weights file; report what was mapped, converted and ignored."""
    state, layout, renamed, ignored = to_timm(unwrap(read_weights(path)))
    arch = infer_arch(state, layout, heads)
    encoder = ViT(arch)
    own = set(encoder.state_dict())
    missing = sorted(own - set(state))
    if missing:
        raise ExportError(f"{path} lacks weights the teacher needs: {', '.join(missing[:12])}"
                          f"{' ...' if len(missing) > 12 else ''}")
    unexpected = sorted(set(state) - own)
    if unexpected:
        raise ExportError(f"{path}: weights the {layout} teacher does not know: {', '.join(unexpected[:12])}")
    encoder.load_state_dict(state, strict=True)
    report = {"layout": layout, "mapped": len(state), "converted": len(renamed), "ignored": ignored,
              "architecture": arch.to_dict()}
    return encoder, report


def resize_grid(encoder: ViT, grid: int, fixed_sincos: bool) -> tuple[ViT, str | None]:
    """The same encoder on a grid x grid token grid (its input resized to grid x patch pixels):
    learned position embeddings are interpolated (bicubic, as timm), sin-cos ones recomputed."""
    arch = encoder.arch
    if arch.grid == grid:
        return encoder, None
    import dataclasses

    new = ViT(dataclasses.replace(arch, img_size=grid * arch.patch_size))
    state = encoder.state_dict()
    if fixed_sincos:
        state["pos_embed"] = new.pos_embed
    else:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], (grid, grid), num_prefix_tokens=1)
    new.load_state_dict(state, strict=True)
    return new, f"pos_embed {arch.grid}x{arch.grid} -> {grid}x{grid}, input {arch.img_size} -> {new.arch.img_size} px"
