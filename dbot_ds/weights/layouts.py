"""Teachers from local weight files, in the layouts people have on disk.

- timm state dicts of ViTs (DeiT, DINO, MAE, CLIP ViTs such as vit_base_patch16_clip_224);
- the original DINO and MAE releases (timm key names inside `teacher` / `model` wrappers, with
  `module.` / `backbone.` prefixes);
- OpenAI CLIP and open_clip checkpoints (the `visual.*` tower, with its projection `proj`).
Files are data: safetensors, or torch.load(weights_only=True). The architecture (width, depth,
patch, grid, pre-norm, patch bias, CLIP's projection) comes from the weights; heads from the
width (ViT convention). A CLIP tower (one with CLIP's pre-norm `ln_pre`) was trained on images
normalised with CLIP's mean/std and sees them so; every other teacher ImageNet's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from dbot_ds.files import atomic_write
from dbot_ds.weights.export import ExportError, load_fitting
from dbot_ds.models import ViTArch, build_encoder
from dbot_ds.models.pos_embed import resample_pos_table

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
    (r"visual\.proj", "proj.weight"),  # [width, out] applied as x @ proj: transposed below
]


HEADS_KEY = "num_heads"  # safetensors metadata that dbot-ds writes beside timm-named weights


def write_timm_weights(path: str | Path, state: dict[str, torch.Tensor], heads: int, **metadata: str) -> None:
    """timm-named weights as safetensors (atomically), with their head count: they load into a
    timm model, or back here as a teacher or probe encoder."""
    atomic_write(Path(path), save({k: v.detach().cpu().contiguous() for k, v in state.items()},
                                  metadata={"format": "pt", HEADS_KEY: str(heads), **metadata}))


def read_weights(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"teacher weights {path} not found (a dbot-ds export dir or a weights file)")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own errors for a broken header or truncated data
            raise ExportError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"{path}: not loadable as weights only ({type(e).__name__}: {e}); "
                          "convert it to safetensors or a plain state dict") from e
    if not isinstance(loaded, dict):
        raise ExportError(f"{path} holds a {type(loaded).__name__}, not a state dict of named tensors")
    return loaded


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
                    elif new == "proj.weight":
                        v = v.t().contiguous()
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
    renamed = []
    if "norm_pre.weight" in sd and "head.weight" in sd:  # a timm CLIP tower: its head is CLIP's proj
        if "head.bias" in sd and sd["head.bias"].abs().max() > 0:
            raise ExportError("this CLIP tower's head has a non-zero bias: not CLIP's projection "
                              "(timm writes CLIP's `proj` as head.weight with a zero bias)")
        keep["proj.weight"] = sd["head.weight"]
        renamed.append("head.weight")
    if "norm.weight" not in sd and "fc_norm.weight" in sd:  # fine-tuned with average pooling
        keep.update({"norm.weight": sd["fc_norm.weight"], "norm.bias": sd["fc_norm.bias"]})
        renamed += ["fc_norm.weight", "fc_norm.bias"]
    return keep, "timm", renamed, sorted(set(sd) - set(keep) - set(renamed))


def file_heads(path: Path) -> int | None:
    """The head count a safetensors file states in its metadata (dbot-ds writes it), if any."""
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as f:
        value = (f.metadata() or {}).get(HEADS_KEY)
    if value is None:  # a timm model directory (save_for_hf) states it in config.json
        config = path.parent / "config.json"
        try:
            value = json.loads(config.read_text()).get("model_args", {}).get("num_heads") if config.is_file() else None
        except (OSError, json.JSONDecodeError, AttributeError):
            value = None
    if value is not None and (not str(value).isdigit() or int(value) < 1):
        raise ExportError(f"{path}: its metadata gives {HEADS_KEY}={value!r}, not a head count (a whole number "
                          "from 1); fix the file's metadata")
    return int(value) if value is not None else None


REQUIRED = ("patch_embed.proj.weight", "pos_embed", "cls_token")  # what the architecture is read from
# how each command takes a head count the weights do not state (probe, analyze and finetune take
# none of their own: the file's metadata is their way)
GIVE_HEADS = (f"give it: teacher.heads=N (pretrain), or for any command (probe, analyze, finetune) save the weights "
              f"as safetensors with metadata {{'{HEADS_KEY}': 'N'}} (safetensors.torch.save_file(state, path, "
              f"metadata={{'{HEADS_KEY}': 'N', 'format': 'pt'}}))")


def head_count(width: int, heads: int | None) -> int:
    """The head count given (teacher.heads, the file's metadata), else the width's standard one."""
    if heads is not None:
        if heads < 1:
            raise ExportError(f"a head count of {heads}: give a whole number from 1")
        return heads
    if width not in HEADS_BY_WIDTH:  # the weights do not tell; a guess would give a silently different teacher
        standard = ", ".join(f"{w}: {h}" for w, h in HEADS_BY_WIDTH.items())
        raise ExportError(f"a {width}-wide ViT has no standard head count ({standard}): {GIVE_HEADS}")
    return HEADS_BY_WIDTH[width]


def infer_arch(sd: dict, layout: str, heads: int | None = None) -> ViTArch:
    absent = [k for k in REQUIRED if k not in sd]
    if absent:
        raise ExportError(f"the {layout} weights lack {', '.join(absent)}: a teacher needs its patch embedding, "
                          "position table and cls token")
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
        raise ExportError(f"patch_embed.proj.weight has shape {tuple(w.shape)}: not a square patch embedding")
    width, patch = w.shape[0], w.shape[-1]
    heads = head_count(width, heads)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    pos = sd["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
        raise ExportError(f"the {layout} weights' pos_embed has shape {tuple(pos.shape)}, not [1, 1+patches, {width}]: "
                          "not a ViT position table")
    tokens = pos.shape[1] - 1
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens:
        raise ExportError(f"pos_embed has {tokens} patch positions (+cls): not a square grid")
    if depth and "blocks.0.mlp.fc1.weight" not in sd:
        raise ExportError(f"the {layout} weights have blocks but no blocks.0.mlp.fc1.weight")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / width if depth else 4.0
    proj = sd.get("proj.weight")
    try:
        return ViTArch(width=width, depth=depth, heads=heads,
                       patch_size=patch, img_size=grid * patch, mlp_ratio=mlp_ratio,
                       pre_norm="norm_pre.weight" in sd, patch_bias="patch_embed.proj.bias" in sd,
                       act="quick_gelu" if layout == "openai_clip" else "gelu",
                       norm_eps=1e-5 if "norm_pre.weight" in sd else 1e-6,  # CLIP towers: torch's default
                       proj_dim=proj.shape[0] if proj is not None else None)
    except ValueError as e:
        raise ExportError(f"the {layout} weights describe no valid ViT: {e}") from e


def input_norm_of(arch: ViTArch) -> str:
    """CLIP towers (pre-norm) were trained on CLIP-normalised images; the rest on ImageNet's."""
    return "clip" if arch.pre_norm else "imagenet"


def import_teacher(path: str | Path, heads: int | None = None) -> tuple[nn.Module, dict]:
    """Build a ViT from a weights file; report what was mapped, converted and ignored, and the
    input normalisation the teacher was trained with."""
    return encoder_from_state(read_weights(path), str(path), heads if heads is not None else file_heads(Path(path)))


def encoder_from_state(sd: dict, source: str, heads: int | None = None, input_norm: str | None = None,
                       arch_from_model: dict | None = None) -> tuple[nn.Module, dict]:
    """Our encoder from a state dict in any of the layouts above, loaded strictly; the report
    says what was mapped, converted and ignored and the input normalisation (input_norm, else
    the architecture's: CLIP's for a CLIP tower). arch_from_model: ViTArch fields the weights
    do not show (activation, LayerNorm epsilon) as a live model has them."""
    state, layout, renamed, ignored = to_timm(unwrap(sd))
    arch = infer_arch(state, layout, heads)
    if arch_from_model:
        arch = dataclasses.replace(arch, **arch_from_model)
    encoder = build_encoder(arch)
    own = set(encoder.state_dict())
    missing = sorted(own - set(state))
    if missing:
        raise ExportError(f"{source} lacks weights the teacher needs: {', '.join(missing[:12])}"
                          f"{' ...' if len(missing) > 12 else ''}")
    unexpected = sorted(set(state) - own)
    if unexpected:
        raise ExportError(f"{source}: weights the {layout} teacher does not know: {', '.join(unexpected[:12])}")
    load_fitting(encoder, state, source)
    report = {"layout": layout, "mapped": len(state), "converted": len(renamed), "ignored": ignored,
              "architecture": arch.to_dict(), "input_norm": input_norm or input_norm_of(arch),
              "projection": arch.proj_dim}
    return encoder, report


def resize_grid(encoder: nn.Module, grid: int) -> tuple[nn.Module, str | None]:
    """The same encoder on a grid x grid token grid (its input resized to grid x patch pixels).
    Its position table, learned or sin-cos, is resampled bicubically as the authors'
    interpolate_pos_encoding does at every forward (done once here)."""
    arch = encoder.arch
    if arch.grid == grid:
        return encoder, None
    if arch.family == "beit":
        raise ExportError(f"a BEiT-style teacher's relative position bias is defined on its own "
                          f"{arch.grid}x{arch.grid} grid: use it with a student of that grid")
    new = build_encoder(dataclasses.replace(arch, img_size=grid * arch.patch_size))
    state = encoder.state_dict()
    state["pos_embed"] = resample_pos_table(state["pos_embed"], grid)
    new.load_state_dict(state, strict=True)
    return new, f"pos_embed {arch.grid}x{arch.grid} -> {grid}x{grid}, input {arch.img_size} -> {new.arch.img_size} px"
