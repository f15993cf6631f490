"""Resume checkpoints through DeepSpeed (ZeRO-sharded), written so a crash never leaves the
newest-checkpoint pointer on a partial one.

Layout: <run>/checkpoints/<tag>/ holds DeepSpeed's files plus dbot_state.json (stage, step, the
resolved config, what the task records) and whatever files the task keeps (an EMA teacher's
weights).
A save goes to <tag>.partial, is renamed to <tag> once every rank has written, and only then
does the pointer file `latest_complete` move (atomic replace). Assumes a shared filesystem.

Resuming on another number of ranks converts the checkpoint once to DeepSpeed's universal
format (<run>/checkpoints/universal/<tag>) and loads it with load_universal: weights, Adam
moments and step counts continue exactly (ZeRO-1 and ZeRO-2 tested).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from dbot_ds.config import ConfigError, flatten
from dbot_ds.files import atomic_write
from dbot_ds.runtime.distributed import barrier, dist_rank, dist_world_size, from_rank0

STATE = "dbot_state.json"
POINTER = "latest_complete"
UNIVERSAL = "universal"  # checkpoints converted for another number of ranks
TENSORS = "teacher.safetensors"  # the task's tensors: an EMA teacher (the name checkpoints have had)


TAG = re.compile(r"stage(\d+)-step(\d+)")  # what checkpoint_tag writes


def checkpoint_tag(stage: int, step: int) -> str:
    return f"stage{stage}-step{step:08d}"


def stage_checkpoints(root: Path, stage: int) -> list[Path]:
    """The complete checkpoints of one stage, oldest first (by tag: no state file read)."""
    return [c for c in complete_checkpoints(root) if c.name.startswith(f"stage{stage}-")]


def save(engine, root: Path, state: dict, *, is_main: bool, keep: int,
         tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: every rank calls it. state needs 'stage' and 'step'; `tensors` (the task's:
    an EMA teacher) are written beside DeepSpeed's files before the checkpoint counts as complete."""
    tag = checkpoint_tag(state["stage"], state["step"])
    partial, final = root / f"{tag}.partial", root / tag
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=partial.name, save_latest=False)
    barrier()
    if is_main:
        if tensors:
            save_file(tensors, str(partial / TENSORS))
        atomic_write(partial / STATE, json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved again (e.g. after a resume)
        shutil.rmtree(root / UNIVERSAL / tag, ignore_errors=True)  # ... and its conversion with it
        os.replace(partial, final)
        atomic_write(root / POINTER, tag + "\n")
        prune(root, keep)
    barrier()
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (ordered by their tags: no state file is read)."""
    if not root.is_dir():
        return []
    tagged = {p: TAG.fullmatch(p.name) for p in root.iterdir()}
    done = [p for p, m in tagged.items() if m and p.is_dir() and (p / STATE).is_file()]
    return sorted(done, key=lambda p: tuple(map(int, tagged[p].groups())))


def prune(root: Path, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(root / UNIVERSAL / old.name, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint: the pointer's target, else the newest complete directory."""
    pointer = root / POINTER
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE).is_file():
            return candidate
    done = complete_checkpoints(root)
    return done[-1] if done else None


def read_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete dbot-ds checkpoint (no {STATE}); "
                                f"use a directory under <run>/checkpoints/ or --resume auto")
    return json.loads(path.read_text())


def check_same_config(ckpt: Path, config: dict, may_change: tuple[str, ...]) -> None:
    """Refuse to resume from `ckpt` if its saved config differs from `config` in any key (dotted)
    outside `may_change`; the error lists every changed key. A key the checkpoint does not know
    (added to the config since it was saved) is not compared."""
    saved, now = flatten(read_state(ckpt)["config"]), flatten(json.loads(json.dumps(config)))  # tuples as lists
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(saved)
            if saved[k] != now.get(k) and k not in may_change]
    if diff:
        raise ConfigError(f"cannot resume from {ckpt}: the run config changed since it was saved:\n  - "
                          + "\n  - ".join(diff) + "\nresume with the same config, or start a new --out")


def load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The task's tensors saved with `ckpt` (none for most tasks)."""
    path = Path(ckpt) / TENSORS
    return load_file(str(path)) if path.is_file() else {}


def resume_ds_config(ds_config: dict, ckpt: Path | None, world_size: int) -> dict:
    """The DeepSpeed config of an engine that resumes from `ckpt`: ZeRO keeps the optimizer
    state partitioned by rank, so a checkpoint of another number of ranks loads through
    DeepSpeed's universal format (load_universal)."""
    if ckpt is None:
        return ds_config
    state = read_state(ckpt)
    if state["world_size"] == world_size or state.get("zero_stage", 0) == 0:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def universal(ckpt: Path) -> Path:
    """`ckpt` in DeepSpeed's universal (world-size independent) format, in
    <checkpoints>/universal/<tag>: converted once, by rank 0, atomically. Collective."""
    out = ckpt.parent / UNIVERSAL / ckpt.name
    failed = None
    if dist_rank() == 0 and not out.is_dir():
        try:
            convert_to_universal(ckpt, out)
        except Exception as e:  # DeepSpeed's converter: tell every rank, not only this one
            failed = (f"cannot convert {ckpt} for {dist_world_size()} ranks (DeepSpeed's ds_to_universal: "
                      f"{type(e).__name__}: {e}); resume on its {read_state(ckpt)['world_size']} ranks instead")
    failed = from_rank0(failed)  # collective: the other ranks wait here for the conversion
    if failed:
        raise ConfigError(failed)
    return out


def convert_to_universal(ckpt: Path, out: Path) -> None:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    # inject_missing_state: our engines wrap a plain module, whose checkpoints DeepSpeed saves
    # without the universal_checkpoint_info the converter looks for
    ds_to_universal(argparse.Namespace(input_folder=str(ckpt), output_folder=str(partial), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    os.replace(partial, out)


def load(engine, ckpt: Path) -> dict:
    """Weights and optimizer state into a freshly built engine (one with universal loading for
    a checkpoint of another number of ranks: resume_ds_config); returns the dbot state."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    source = universal(ckpt) if engine.load_universal_checkpoint() else ckpt
    if source is ckpt and state["world_size"] != dist_world_size() and state.get("zero_stage", 0) > 0:
        raise ConfigError(f"{ckpt} was saved by {state['world_size']} ranks, this run has {dist_world_size()}: "
                          "its engine needs universal loading (checkpoint.resume_ds_config)")
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {ckpt}")
    return state


def consolidated_student_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 student weights from a checkpoint on disk, without an engine (for `dbot-ds export`)."""
    ckpt = Path(ckpt)
    stage = read_state(ckpt)["zero_stage"]
    if stage == 0:
        states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in states["module"].items()}
    return {k: v.float() for k, v in
            get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name).items()}
