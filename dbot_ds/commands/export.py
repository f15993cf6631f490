"""`dbot-ds export`: a pre-training resume checkpoint consolidated into a stage export (its
ZeRO shards gathered into fp32 weights), or a stage export as timm weights with a model card."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dbot_ds.config import ConfigError, RunConfig, from_dict
from dbot_ds.method.student import Student
from dbot_ds.runtime import checkpoint
from dbot_ds.weights.export import META, stage_meta, write_export
from dbot_ds.weights.timm import export_timm, push_to_hub


def export_checkpoint(ckpt: str | Path, out: str | Path) -> Path:
    """Consolidate a (ZeRO-sharded) pre-training checkpoint into a stage export at `out`."""
    ckpt = Path(ckpt)
    state_info = checkpoint.read_state(ckpt)
    if "init" in state_info["config"]:
        raise ConfigError(f"{ckpt} is a fine-tuning checkpoint: the run writes its classifier to "
                          "<run>/model.safetensors when it ends")
    cfg = from_dict(RunConfig, state_info["config"])
    state = checkpoint.consolidated_student_state(ckpt)
    width = state["head.weight"].shape[0]
    with torch.device("meta"):  # for its key names: no weights allocated or initialised
        student = Student(cfg.model.encoder_arch(), cfg.model.decoder_arch(), width)
    state.update(student.fixed_buffers())
    missing = set(student.state_dict()) - set(state)
    if missing:
        raise ConfigError(f"{ckpt}: the checkpoint lacks {sorted(missing)}")
    write_export(out, state, stage_meta(cfg, stage=state_info["stage"], steps=state_info["step"],
                                        teacher_sha256=state_info["teacher"], target_width=width,
                                        from_checkpoint=str(ckpt)))
    return Path(out)


def main(args) -> int:
    if args.push_to_hub and args.format != "timm":
        raise ConfigError("--push-to-hub uploads a timm model directory: add --format timm")
    if args.format == "timm":
        metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
        metrics = metrics if isinstance(metrics, dict) or metrics is None else {"results": metrics}
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(args.source)
            if not (source / META).is_file():  # a resume checkpoint: consolidated into an export first
                source = export_checkpoint(source, Path(tmp) / "export")
            path = export_timm(source, args.out, metrics)
        if args.push_to_hub:
            print(f"uploaded: {push_to_hub(path, args.push_to_hub, private=args.private)}")
    else:
        path = export_checkpoint(args.source, args.out)
    print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="a resume checkpoint or stage export -> export / timm model (Hub)")
    p.add_argument("source", help="a checkpoint dir (<run>/checkpoints/<tag>) or a stage export dir")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["dbot", "timm"], default="dbot",
                   help="timm: a model directory timm.create_model('local-dir:OUT', pretrained=True) loads")
    p.add_argument("--metrics", help="a JSON of results (e.g. from dbot-ds probe) for the model card")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload it to the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    p.set_defaults(func=main)
