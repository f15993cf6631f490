"""Exports: consolidated weights (safetensors) + meta.json, enough to rebuild the model.

The one definition of an export: its format, what meta.json holds (stage_meta), writing it
(atomically, never over different weights) and reading it back (verified by sha256), whole or
as the encoder alone. An export is finished work: the next stage's teacher.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dbot_ds.errors import UserError
from dbot_ds.config import RunConfig
from dbot_ds.files import atomic_write, stays_inside
from dbot_ds.input_norms import STUDENT_NORM
from dbot_ds.models import ViTArch, build_encoder

WEIGHTS = "model.safetensors"
META = "meta.json"
FORMAT = "dbot-ds-export/1"


class ExportError(UserError, RuntimeError):
    """A missing, incomplete, corrupt or conflicting export."""


def weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Identity of a set of weights: the sha256 of exactly the bytes an export would hold."""
    return sha256(weights_bytes(state))


def write_export(out_dir: str | Path, state: dict[str, torch.Tensor], meta: dict) -> str:
    """Write weights + meta.json atomically (temp dir, then rename); returns the sha256.

    If out_dir already holds the same weights this is a no-op; different weights are an error.
    """
    out_dir = Path(out_dir)
    data = weights_bytes(state)
    digest = sha256(data)
    if out_dir.exists():
        existing = read_meta(out_dir)
        if existing.get("sha256") == digest:
            return digest
        raise ExportError(
            f"{out_dir} already holds a different export (sha256 {existing.get('sha256')}, "
            f"new {digest}); refusing to overwrite finished work. Move it away or pick another --out.")
    meta = {"format": FORMAT, **meta, "weights": WEIGHTS, "sha256": digest,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write(tmp / WEIGHTS, data)
    atomic_write(tmp / META, json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out_dir)
    return digest


def read_meta(export_dir: str | Path) -> dict:
    path = Path(export_dir) / META
    if not path.is_file():
        raise ExportError(f"no {META} in {export_dir}: not a dbot-ds export (or an unfinished one); "
                          "point to a directory written by `dbot-ds pretrain` or `dbot-ds export`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e}); the export is corrupt, re-export it") from e
    if not isinstance(meta, dict):
        raise ExportError(f"{path} holds a JSON {type(meta).__name__}, not an export's meta.json (an object); "
                          "point to a directory written by `dbot-ds pretrain` or `dbot-ds export`")
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_export(export_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify (sha256 against meta.json) an export; returns (state_dict, meta)."""
    meta = read_meta(export_dir)
    name = meta.get("weights", WEIGHTS)
    if not isinstance(name, str) or not stays_inside(name):
        raise ExportError(f"{Path(export_dir) / META} names weights {name!r} outside the export's folder: "
                          "an export keeps its weights beside its meta.json")
    weights = Path(export_dir) / name
    if not weights.is_file():
        raise ExportError(f"{weights} is missing: the export is incomplete; re-export it")
    data = weights.read_bytes()
    if sha256(data) != meta.get("sha256"):
        raise ExportError(f"{weights}: sha256 {sha256(data)} does not match meta.json "
                          f"({meta.get('sha256')}); the file is corrupt or was replaced; re-export it")
    return st_load(data), meta


def stage_meta(cfg: RunConfig, *, stage: int, steps: int, teacher_sha256: str, target_width: int,
               **extra) -> dict:
    """meta.json of a student export: everything needed to rebuild the student (and its encoder,
    the next stage's teacher) with no other input."""
    decoder = cfg.model.decoder_arch()
    return {"stage": stage, "recipe": cfg.recipe, "steps": steps, "teacher_sha256": teacher_sha256,
            "encoder": cfg.model.encoder_arch().to_dict(), "decoder": decoder.to_dict() if decoder else None,
            "target_width": target_width, "drop_path": cfg.model.resolved_drop_path(),
            "input_norm": STUDENT_NORM,  # what its images were normalised with, as a teacher sees them
            "epochs": cfg.stages.epochs[stage - 1] if stage <= len(cfg.stages.epochs) else None,
            "config": cfg.to_dict(), **extra}


def encoder_state(state: dict[str, torch.Tensor], prefix: str = "encoder.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_fitting(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `module` strictly; what does not fit is named (key, shapes)."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ExportError(f"{source}: the weights do not fit the architecture: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
    wrong = [f"{k} {tuple(state[k].shape)} (the architecture has {tuple(v.shape)})"
             for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ExportError(f"{source}: weights of the wrong shape for its architecture: {'; '.join(wrong[:4])}")
    module.load_state_dict(state, strict=True)


def encoder_from_export(path: str | Path):
    """-> (the export's encoder, rebuilt from meta.json and loaded strictly, meta)."""
    state, meta = read_export(path)
    try:
        encoder = build_encoder(ViTArch(**meta["encoder"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{Path(path) / META}: no valid encoder architecture ({type(e).__name__}: {e})") from e
    load_fitting(encoder, encoder_state(state), f"{path} (meta.json's encoder)")
    return encoder, meta
