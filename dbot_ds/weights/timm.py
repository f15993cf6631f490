"""An export's encoder as a timm model directory, the Hugging Face Hub way: timm's save_for_hf
(config.json with the architecture and its arguments, model.safetensors) and a model card with
YAML front matter (huggingface_hub's ModelCardData), so `timm.create_model("local-dir:OUT",
pretrained=True)` or, once pushed, `timm.create_model("hf-hub:ORG/NAME", pretrained=True)` rebuilds
it with no further arguments.

config.json is written in full here (model_args, a complete pretrained_cfg) rather than left to
timm: timm releases differ in what save_for_hf records by itself (before 1.0.2x no model_args, and
pretrained_cfg replaced by the one given), and every release setup.py allows must load it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dbot_ds.config import ConfigError
from dbot_ds.errors import UserError
from dbot_ds.input_norms import INPUT_NORMS
from dbot_ds.method.classifier import timm_kwargs
from dbot_ds.weights.export import ExportError, encoder_state, load_fitting, read_export
from dbot_ds.weights.model_card import LICENSE, model_card

# a registered timm architecture per family; the export's own sizes go in its model_args
ARCHITECTURES = {"vit": "vit_base_patch16_224", "beit": "beit_base_patch16_224"}
EXPORT_FILES = ("README.md", "config.json", "model.safetensors")  # all a timm export holds
TAG_PREFIX = "dbot_"  # pretrained_cfg's tag of our exports: how an earlier one is recognised


class UploadError(UserError, RuntimeError):
    """The model directory is written but could not be uploaded to the Hub."""


def timm_architecture(arch: dict) -> str:
    return ARCHITECTURES[arch.get("family", "vit")]


def model_args(arch: dict) -> dict:
    """timm's arguments of the encoder, as config.json records them (num_classes is at its root)."""
    return {k: v for k, v in timm_kwargs(arch).items() if k != "num_classes"}


def timm_model(architecture: str, kwargs: dict, state: dict):
    """timm's model for the export's encoder (features only), holding its weights (strictly)."""
    import timm

    model = timm.create_model(architecture, pretrained=False, num_classes=0, **kwargs)
    load_fitting(model, encoder_state(state), "the export's encoder in timm's layout")
    return model.eval()


def pretrained_cfg(meta: dict) -> dict:
    """A complete pretrained_cfg: what timm's data config and loader read (input size, mean/std)."""
    norm = meta.get("input_norm", "imagenet")
    if norm not in INPUT_NORMS:
        raise ExportError(f"the export's meta.json gives input_norm {norm!r}, not one of {', '.join(INPUT_NORMS)}")
    mean, std = INPUT_NORMS[norm]
    img = meta["encoder"]["img_size"]
    return {"tag": f"{TAG_PREFIX}{meta['recipe']}_stage{meta['stage']}", "license": LICENSE,
            "input_size": [3, img, img], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 0.875, "crop_mode": "center", "mean": list(mean), "std": list(std),
            "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"}


def is_timm_export(folder: Path) -> bool:
    """A directory written by export_timm: only its files, and our tag in config.json."""
    if not {p.name for p in folder.iterdir()} <= set(EXPORT_FILES):
        return False
    try:
        tag = json.loads((folder / "config.json").read_text())["pretrained_cfg"]["tag"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(tag, str) and tag.startswith(TAG_PREFIX)


def check_out(out: Path) -> None:
    """--out is new, empty, or an earlier timm export of ours: never other files (a stage export,
    a checkout) that writing into it would overwrite."""
    if out.is_file():
        raise ExportError(f"--out {out} is a file: give a directory for the timm model")
    if out.is_dir() and any(out.iterdir()) and not is_timm_export(out):
        raise ExportError(f"--out {out} is not empty and holds no timm export of dbot-ds: writing there would "
                          "overwrite its files; give a new or empty directory")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out`, replacing an (earlier export) directory there."""
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)  # onto nothing, or an empty directory


def export_timm(source: str | Path, out: str | Path, metrics: dict | None = None,
                repo_id: str | None = None) -> Path:
    """The export's encoder as a timm model directory (see above); returns the directory. It is
    written beside `out` and renamed into place: an interrupted export leaves `out` as it was."""
    from timm.models import save_for_hf

    out = Path(out).resolve()  # `.` has a name, and a parent to write beside it in
    check_out(out)
    state, meta = read_export(source)
    architecture, kwargs = timm_architecture(meta["encoder"]), model_args(meta["encoder"])  # once: model, card
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_for_hf(timm_model(architecture, kwargs, state), str(tmp), model_args=kwargs,
                    model_config={"pretrained_cfg": pretrained_cfg(meta)}, safe_serialization=True)
        name = repo_id.split("/")[-1] if repo_id else out.name
        (tmp / "README.md").write_text(model_card(meta, architecture, kwargs, metrics, name, repo_id))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted export left
    return out


def check_repo_id(repo_id: str) -> None:
    """A valid Hub repository id, before anything is written."""
    from huggingface_hub.utils import validate_repo_id
    from huggingface_hub.errors import HFValidationError

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"--push-to-hub {repo_id!r} is not a Hugging Face repository id ({e}): "
                          "give ORG/NAME (letters, digits, '-', '_', '.')") from e


def is_network_error(error: BaseException) -> bool:
    """What a failed upload raises: huggingface_hub's errors (OSErrors: HTTP status, offline mode,
    no token) or its HTTP client's (requests, httpx: which depends on its version)."""
    clients = {"requests", "urllib3", "httpx", "httpx2", "httpcore"}
    return isinstance(error, OSError) or any(t.__module__.split(".")[0] in clients for t in type(error).__mro__)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload the export's files of a model directory with huggingface_hub (the token from
    `hf auth login` or HF_TOKEN); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=list(EXPORT_FILES),
                                     commit_message="Add a dbot-ds encoder"))
    except Exception as e:
        if not is_network_error(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise UploadError(f"wrote {folder}, but uploading it to {repo_id} failed ({type(e).__name__}: {first}); "
                          f"upload it later with `hf upload {repo_id} {folder}` (log in with `hf auth login` "
                          "or set HF_TOKEN)") from e
