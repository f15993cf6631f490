"""Encoders and teachers from any source a command accepts, in one place:

- a dbot-ds export directory (a stage export, `dbot-ds export` output), verified by sha256;
- `teacher:<stage-1 export>`: the exact random teacher stage 1 distilled from, rebuilt from the
  export's config and checked against its teacher_sha256;
- a weights file in a layout people have on disk (timm, DINO, MAE, OpenAI CLIP / open_clip,
  `dbot-ds finetune`'s model.safetensors), read as data (layouts.py);
- `hf-hub:ORG/NAME`, `timm:NAME` or `local-dir:PATH`, resolved by timm and huggingface_hub
  (offline from the local Hugging Face cache: hub.py).

Pre-training, probe, finetune and analyze all load through here.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dbot_ds.config import RunConfig, from_dict
from dbot_ds.files import file_sha256
from dbot_ds.input_norms import STUDENT_NORM
from dbot_ds.method.teacher import TeacherWeights, check_fits, random_encoder, random_teacher_arch
from dbot_ds.seeding import derive_seed
from dbot_ds.weights.export import ExportError, encoder_from_export, read_meta, state_sha256
from dbot_ds.weights.hub import import_hub, is_hub_source
from dbot_ds.weights.layouts import import_teacher, resize_grid
from dbot_ds.weights.rundir import RunDir


def load_encoder(source: str, heads: int | None = None) -> nn.Module:
    """The encoder named by `source` (see above)."""
    if source.startswith("teacher:"):
        meta = read_meta(source[len("teacher:"):])
        teacher = initial_teacher(from_dict(RunConfig, meta["config"]), verbose=False)
        if teacher.identity != meta["teacher_sha256"]:
            raise ExportError(f"{source}: the rebuilt teacher does not match the export's teacher_sha256")
        return teacher.encoder
    if is_hub_source(source):
        return import_hub(source)[0]
    if Path(source).is_file():
        return import_teacher(source, heads)[0]
    return encoder_from_export(source)[0]


def initial_teacher(cfg: RunConfig, verbose: bool = True) -> TeacherWeights:
    """Stage 1's teacher: a random one from the seed, or a pretrained one (a dbot-ds export, or a
    timm / DINO / MAE / CLIP weights file) read, checked and put on the student's token grid."""
    student_arch = cfg.model.encoder_arch()
    if cfg.teacher.init == "random":
        encoder = random_encoder(random_teacher_arch(student_arch, cfg.teacher.random_depth),
                                 derive_seed(cfg.seed, "random-teacher"))
        return TeacherWeights(encoder, state_sha256(encoder.state_dict()), STUDENT_NORM)
    source = Path(cfg.teacher.init)
    if is_hub_source(cfg.teacher.init):
        encoder, report = import_hub(cfg.teacher.init)
        identity, source = state_sha256(encoder.state_dict()), cfg.teacher.init
    elif source.is_dir() or not source.exists():
        encoder, meta = encoder_from_export(source)
        identity, report = meta["sha256"], {"layout": "dbot-ds export",
                                            "input_norm": meta.get("input_norm", STUDENT_NORM)}
    else:
        encoder, report = import_teacher(source, cfg.teacher.heads)
        identity = file_sha256(source)
    check_fits(encoder.arch, student_arch, str(source))
    encoder, resized = resize_grid(encoder, student_arch.grid)
    if verbose:
        print(f"teacher {source}: {report['layout']}, {encoder.arch.width} wide, {encoder.arch.depth} deep, "
              f"patch {encoder.arch.patch_size}; mapped {report.get('mapped', 'all')} tensors, "
              f"converted {report.get('converted', 0)}, ignored {report.get('ignored', [])}; "
              f"input normalisation {report['input_norm']}"
              + (f" (run config: {cfg.teacher.input_norm})" if cfg.teacher.input_norm != "auto" else "")
              + (f"; output projection to {encoder.arch.proj_dim}" if encoder.arch.proj_dim else "")
              + (f"; interpolated {resized}" if resized else ""), flush=True)
    return TeacherWeights(encoder, identity, report["input_norm"])


def stage_teacher(cfg: RunConfig, run: RunDir, stage: int, verbose: bool = True) -> TeacherWeights:
    """Stage `stage`'s teacher: stage 1's initial one, else stage k-1's export, verified by
    sha256 and checked against the student's grid."""
    if stage == 1:
        return initial_teacher(cfg, verbose)
    source = run.export(stage - 1)
    try:
        encoder, meta = encoder_from_export(source)
    except ExportError as e:
        raise ExportError(f"stage {stage} needs stage {stage - 1}'s export as its teacher: {e}") from e
    check_fits(encoder.arch, cfg.model.encoder_arch(), f"of stage {stage} ({source})")
    return TeacherWeights(encoder, meta["sha256"], meta.get("input_norm", STUDENT_NORM))
