"""`dbot-ds export`: a pre-training resume checkpoint consolidated into a stage export (its
ZeRO shards gathered into fp32 weights), or a stage export as timm weights with a model card."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dbot_ds.config import ConfigError, RunConfig, from_dict
from dbot_ds.method.student import Student
from dbot_ds.runtime import checkpoint
from dbot_ds.weights.export import META, stage_meta, write_export
from dbot_ds.weights.model_card import read_metrics
from dbot_ds.weights.timm import check_out, check_repo_id, export_timm, push_to_hub


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
    if args.metrics and args.format != "timm":
        raise ConfigError("--metrics go into the timm model card: add --format timm")
    if args.format == "timm":
        path = export_to_timm(args)
    else:
        path = export_checkpoint(args.source, args.out)
    print(f"wrote {path}")
    return 0


def export_to_timm(args) -> Path:
    """The timm model directory (and its upload): every input checked before anything is written."""
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    metrics = read_metrics(args.metrics, args.source) if args.metrics else None
    check_out(Path(args.out).resolve())  # before a checkpoint is consolidated: minutes
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(args.source)
        if not (source / META).is_file():  # a resume checkpoint: consolidated into an export first
            source = export_checkpoint(source, Path(tmp) / "export")
        path = export_timm(source, args.out, metrics, repo_id=args.push_to_hub)
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(path, args.push_to_hub, private=args.private)}")
    return path


def register(sub) -> None:
    p = sub.add_parser("export", help="a resume checkpoint or stage export -> export / timm model (Hub)")
    p.add_argument("source", help="a checkpoint dir (<run>/checkpoints/<tag>) or a stage export dir")
    p.add_argument("--out", required=True,
                   help="dbot: a new directory; timm: a new or empty directory, or an earlier timm export (replaced)")
    p.add_argument("--format", choices=["dbot", "timm"], default="dbot",
                   help="timm: a model directory timm.create_model('local-dir:OUT', pretrained=True) loads")
    p.add_argument("--metrics", help="with --format timm, the model card's metrics: a JSON object of numbers, "
                   "or `dbot-ds probe --json` output (its row of this export)")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload it to the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repository")
    p.set_defaults(func=main)
