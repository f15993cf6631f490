"""One function that loads an encoder from any source a command accepts (probe, finetune, analyze):

- a dbot-ds export directory (stage export, `dbot-ds export` output), verified by sha256;
- `teacher:<stage-1 export>`: the exact random teacher stage 1 distilled from, rebuilt from the
  export's config and checked against its teacher_sha256;
- a weights file in a layout people have on disk (timm, DINO, MAE, OpenAI CLIP / open_clip,
  `dbot-ds finetune`'s model.safetensors), read as data.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_encoder(source: str) -> nn.Module:
    from dbot_ds.config import RunConfig, from_dict
    from dbot_ds.export import ExportError, read_meta
    from dbot_ds.stages import initial_teacher_encoder
    from dbot_ds.teacher import encoder_from_export
    from dbot_ds.teacher_import import import_teacher

    if source.startswith("teacher:"):
        meta = read_meta(source[len("teacher:"):])
        teacher = initial_teacher_encoder(from_dict(RunConfig, meta["config"]), verbose=False)
        if teacher.identity != meta["teacher_sha256"]:
            raise ExportError(f"{source}: the rebuilt teacher does not match the export's teacher_sha256")
        return teacher.encoder
    if Path(source).is_file():
        return import_teacher(source)[0]
    return encoder_from_export(source)[0]
