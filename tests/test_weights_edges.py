"""The weights layer's edges: timm exports that load with any allowed timm and never write over
other files, Hub uploads that fail in one line, hub / timm / local-dir sources read from the
live model (activation, epsilon, CLIP's projection, BEiT) or refused in one line, and the model
card's inputs. No network: huggingface_hub's calls are intercepted."""

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from helpers import tiny_args, tiny_config
from safetensors.torch import save_file

from dbot_ds.cli import main
from dbot_ds.files import file_sha256
from dbot_ds.method.stages import fresh_student
from dbot_ds.weights import timm as timm_export
from dbot_ds.weights.export import ExportError, encoder_from_export, read_meta, stage_meta, write_export
from dbot_ds.weights.layouts import import_teacher
from dbot_ds.weights.sources import load_encoder

BEIT = ["model.family=beit", "model.decoder=false", "mask.kind=block", "mask.patches=6", "mask.block_min=2"]
SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def untrained_export(out: Path, *overrides: str, **meta_extra) -> Path:
    """A stage export of a freshly initialised student (no training: the weights layer only)."""
    cfg = tiny_config("stages.epochs=[1]", *overrides)
    student = fresh_student(cfg, 1, 32)
    meta = stage_meta(cfg, stage=1, steps=0, teacher_sha256="0" * 64, target_width=32)
    for key, value in meta_extra.items():
        meta["config"]["data"][key] = value
    write_export(out, student.state_dict(), meta)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return untrained_export(tmp_path_factory.mktemp("w") / "stage1")


def features_equal(a, b, size=32) -> bool:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def to_timm(source, out, *extra) -> int:
    return main(["export", str(source), "--out", str(out), "--format", "timm", *extra])


# ------------------------------------------------------------------ any allowed timm

def test_a_timm_export_loads_even_where_timm_records_no_model_args(export, tmp_path, monkeypatch):
    """timm releases before 1.0.2x record no model_args: config.json must not depend on them."""
    built = timm_export.timm_model

    def unrecorded(*args):
        model = built(*args)
        model.__dict__.pop("_model_args", None)
        return model

    monkeypatch.setattr(timm_export, "timm_model", unrecorded)
    assert to_timm(export, tmp_path / "m") == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_args"]["embed_dim"] == 32 and config["model_args"]["depth"] == 2
    assert list(config["pretrained_cfg"]["input_size"]) == [3, 32, 32]
    model = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()
    assert features_equal(model.forward_features, encoder_from_export(export)[0].eval())


# ------------------------------------------------------------------ --out and what is uploaded

def test_out_holding_other_files_is_refused_and_left_as_it_was(export, tmp_path, capsys):
    export = Path(shutil.copytree(export, tmp_path / "stage1"))  # a copy: were it overwritten
    weights = file_sha256(export / "model.safetensors")
    assert to_timm(export, export) == 2  # the stage export itself: the next stage's teacher
    assert "is not empty and holds no timm export of dbot-ds" in capsys.readouterr().err
    assert file_sha256(export / "model.safetensors") == weights and read_meta(export)["sha256"]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "README.md").write_text("mine\n")
    assert to_timm(export, checkout) == 2
    assert (checkout / "README.md").read_text() == "mine\n" and len(list(checkout.iterdir())) == 1


def test_an_earlier_timm_export_is_replaced_and_nothing_is_left_beside_it(export, tmp_path):
    (tmp_path / "empty").mkdir()
    assert to_timm(export, tmp_path / "empty") == 0
    first = file_sha256(tmp_path / "empty" / "model.safetensors")
    assert to_timm(export, tmp_path / "empty") == 0  # its own earlier export: replaced
    assert file_sha256(tmp_path / "empty" / "model.safetensors") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temp or old directories
    assert to_timm(export, tmp_path / "empty") == 0 and not (tmp_path / "empty" / "meta.json").exists()


def test_an_interrupted_export_leaves_the_earlier_one_as_it_was(export, tmp_path, monkeypatch):
    assert to_timm(export, tmp_path / "m") == 0
    before = file_sha256(tmp_path / "m" / "model.safetensors")
    other = untrained_export(tmp_path / "other", "seed=7")  # other weights

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(timm_export, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        to_timm(other, tmp_path / "m")
    assert file_sha256(tmp_path / "m" / "model.safetensors") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other"]  # no temp directory left


def test_push_to_hub_uploads_only_the_files_of_the_export(export, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.update(kw) or "https://hub/c")
    assert to_timm(export, tmp_path / "m", "--push-to-hub", "me/dbot-tiny") == 0
    assert sorted(calls["allow_patterns"]) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "hf-hub:me/dbot-tiny" in card and "# dbot-tiny" in card  # the repository's name and id


# ------------------------------------------------------------------ upload failures in one line

def test_a_bad_repo_id_is_refused_before_anything_is_written(export, tmp_path, capsys):
    assert to_timm(export, tmp_path / "m", "--push-to-hub", "bad name!!") == 2
    assert "--push-to-hub 'bad name!!' is not a Hugging Face repository id" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("error", ["offline", "connect"])
def test_a_failed_upload_says_the_folder_is_written_and_how_to_upload_it(export, tmp_path, monkeypatch, capsys, error):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    from dbot_ds.runtime.distributed import free_port

    if error == "offline":
        def fail(self, repo_id, **kw):
            raise OfflineModeIsEnabled("offline mode is enabled")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fail)
    else:  # the real client against a port nothing listens on
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
        monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert to_timm(export, tmp_path / "m", "--push-to-hub", "me/x") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"wrote {tmp_path / 'm'}, but uploading it to me/x failed" in err
    assert f"`hf upload me/x {tmp_path / 'm'}`" in err and "hf auth login" in err
    assert (tmp_path / "m" / "model.safetensors").is_file()


# ------------------------------------------------------------------ broken sources in one line

def test_broken_local_dirs_and_repo_ids_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "noarch").mkdir()
    (tmp_path / "noarch" / "config.json").write_text("{}")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{oops")
    with pytest.raises(ExportError, match="names no architecture"):
        load_encoder(f"local-dir:{tmp_path / 'noarch'}")
    with pytest.raises(ExportError, match="config.json is not valid JSON"):
        load_encoder(f"local-dir:{tmp_path / 'badjson'}")
    with pytest.raises(ExportError, match="'bad name!!' is not a Hugging Face repository id"):
        load_encoder("hf-hub:bad name!!")
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--set", f"teacher.init=local-dir:{tmp_path / 'noarch'}",
                 *tiny_args()]) == 2
    assert "names no architecture" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------ read from the live model

def saved_timm(tmp_path, name, **cfg) -> Path:
    from timm.models import save_for_hf

    model = timm.create_model(name, pretrained=False, **SMALL_VIT).eval()
    save_for_hf(model, str(tmp_path / name), model_config={"pretrained_cfg": cfg} if cfg else None,
                model_args=SMALL_VIT, safe_serialization=True)  # recorded by any timm
    return tmp_path / name


def test_an_unknown_input_normalisation_is_refused_naming_the_known_ones(tmp_path):
    folder = saved_timm(tmp_path, "vit_base_patch16_224", mean=[0.3] * 3, std=[0.7] * 3)
    with pytest.raises(ExportError, match=r"mean \(0.3, 0.3, 0.3\).*none of the normalisations dbot-ds knows "
                                          r"\(imagenet: .*clip: "):
        load_encoder(f"local-dir:{folder}")


def test_a_quickgelu_clip_tower_keeps_its_activation_and_projection(tmp_path):
    folder = saved_timm(tmp_path, "vit_base_patch16_clip_quickgelu_224")
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    ours = load_encoder(f"local-dir:{folder}").eval()
    assert (ours.arch.act, ours.arch.norm_eps, ours.arch.pre_norm) == ("quick_gelu", 1e-5, True)
    assert features_equal(theirs.forward_features, ours)
    save_file(theirs.state_dict(), str(tmp_path / "clip.safetensors"))
    as_file = import_teacher(tmp_path / "clip.safetensors", heads=2)[0]
    assert ours.arch.proj_dim == as_file.arch.proj_dim == 512  # the target width: not by source
    assert torch.equal(ours.proj.weight, as_file.proj.weight)


# ------------------------------------------------------------------ BEiT round trip

def test_a_beit_export_comes_back_from_its_timm_directory(tmp_path):
    export = untrained_export(tmp_path / "stage1", *BEIT)
    assert to_timm(export, tmp_path / "timm") == 0
    back = load_encoder(f"local-dir:{tmp_path / 'timm'}").eval()
    ours, meta = encoder_from_export(export)
    assert back.arch == ours.arch and meta["encoder"]["family"] == "beit"
    assert features_equal(back, ours.eval())


# ------------------------------------------------------------------ meta.json, --metrics, the card

def test_a_meta_json_holding_a_list_is_a_one_line_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "meta.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="meta.json holds a JSON list, not an export's meta.json"):
        read_meta(tmp_path / "x")


def test_metrics_from_probe_json_take_the_exported_encoders_row(export, tmp_path):
    rows = [{"encoder": "teacher:elsewhere", "knn_top1": 0.1, "linear_top1": 0.2, "seconds": 3.0},
            {"encoder": str(export), "knn_top1": 0.42, "linear_top1": 0.51, "seconds": 9.5}]
    (tmp_path / "probe.json").write_text(json.dumps(rows))
    assert to_timm(export, tmp_path / "m", "--metrics", str(tmp_path / "probe.json")) == 0
    card = (tmp_path / "m" / "README.md").read_text()
    front = card.split("---")[1]
    assert "metrics:\n- knn_top1\n- linear_top1\n" in front and "seconds" not in card
    assert "- knn_top1: 0.42" in card and "- linear_top1: 0.51" in card


@pytest.mark.parametrize("content, message", [
    ("{oops", "is not valid JSON"),
    ('{"knn_top1": "high"}', "expected a JSON object of numbers"),
    ('[{"encoder": "/elsewhere", "knn_top1": 0.1}]', "a probe result with no row for"),
])
def test_bad_metrics_are_one_line_errors_before_anything_is_written(export, tmp_path, capsys, content, message):
    (tmp_path / "metrics.json").write_text(content)
    assert to_timm(export, tmp_path / "m", "--metrics", str(tmp_path / "metrics.json")) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_the_card_names_no_data_set_it_does_not_know_and_out_dot_has_a_title(tmp_path, monkeypatch):
    export = untrained_export(tmp_path / "stage1", source="shards", shards="/data/train/manifest.json")
    (tmp_path / "dbot-tiny").mkdir()
    monkeypatch.chdir(tmp_path / "dbot-tiny")
    assert to_timm(export, ".") == 0
    card = (tmp_path / "dbot-tiny" / "README.md").read_text()
    assert "datasets" not in card.split("---")[1] and "imagenet-1k" not in card
    assert "# dbot-tiny\n" in card and "hf-hub:ORG/dbot-tiny" in card


# ------------------------------------------------------------------ weights files

def vit_file(path, heads=None, pos_embed=None) -> Path:
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              **{**SMALL_VIT, "embed_dim": 40, "num_heads": 4})
    state = model.state_dict()
    if pos_embed is not None:
        state["pos_embed"] = pos_embed
    save_file(state, str(path), metadata={"format": "pt", **({"num_heads": heads} if heads is not None else {})})
    return path


def test_a_one_dimensional_pos_embed_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match=r"pos_embed has shape \(40,\), not \[1, 1\+patches, 40\]"):
        import_teacher(vit_file(tmp_path / "w.safetensors", heads="4", pos_embed=torch.zeros(40)))


def test_a_zero_head_count_in_the_metadata_is_refused(tmp_path):
    with pytest.raises(ExportError, match="num_heads='0', not a head count"):
        import_teacher(vit_file(tmp_path / "w.safetensors", heads="0"))


def test_an_unknown_head_count_says_how_each_command_gives_it(tmp_path):
    with pytest.raises(ExportError, match=r"40-wide ViT has no standard head count .*teacher.heads=N \(pretrain\).*"
                                          r"\(probe, analyze, finetune\).*metadata"):
        import_teacher(vit_file(tmp_path / "w.safetensors"))
    assert import_teacher(vit_file(tmp_path / "w.safetensors", heads="4"))[0].arch.heads == 4
