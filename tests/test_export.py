"""`dbot-ds export`: resume checkpoint -> stage export, and timm-compatible encoder weights."""

import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from dbot_ds.cli import main
from dbot_ds.commands.pretrain import pretrain
from dbot_ds.method.student import Student
from dbot_ds.runtime import checkpoint
from dbot_ds.weights.export import ExportError, encoder_from_export, read_export, read_meta, write_export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, process_group):
    out = tmp_path_factory.mktemp("run")
    pretrain(tiny_config(), out)
    return out


def test_an_export_rebuilds_the_student_from_meta_alone(run_dir):
    state, meta = read_export(run_dir / "stage2")
    assert meta["stage"] == 2 and meta["teacher_sha256"] == read_meta(run_dir / "stage1")["sha256"]
    from dbot_ds.models import DecoderArch, ViTArch
    student = Student(ViTArch(**meta["encoder"]), DecoderArch(**meta["decoder"]), meta["target_width"])
    student.load_state_dict(state, strict=True)


def test_checkpoint_export_equals_the_stage_export(run_dir, tmp_path):
    last = checkpoint.latest(run_dir / "checkpoints")
    assert checkpoint.read_state(last)["step"] == 8 and checkpoint.read_state(last)["stage"] == 2
    assert main(["export", str(last), "--out", str(tmp_path / "exp")]) == 0
    assert read_meta(tmp_path / "exp")["sha256"] == read_meta(run_dir / "stage2")["sha256"]


def test_a_zero0_checkpoint_exports_through_a_weights_only_load(process_group, tmp_path):
    pretrain(tiny_config("deepspeed=bench_zero0", "stages.epochs=[1]"), tmp_path / "run")
    last = checkpoint.latest(tmp_path / "run" / "checkpoints")
    assert checkpoint.read_state(last)["zero_stage"] == 0
    assert main(["export", str(last), "--out", str(tmp_path / "exp")]) == 0
    assert read_meta(tmp_path / "exp")["sha256"] == read_meta(tmp_path / "run" / "stage1")["sha256"]


def test_a_timm_export_loads_with_create_model_local_dir_strictly_with_the_same_features(run_dir, tmp_path):
    metrics = tmp_path / "probe.json"
    metrics.write_text(json.dumps({"knn_top1": 0.42, "linear_top1": 0.51}))
    out = tmp_path / "dbot-vit-tiny"
    assert main(["export", str(run_dir / "stage2"), "--out", str(out), "--format", "timm", "--metrics", str(metrics)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # no further arguments
    ours, _ = encoder_from_export(run_dir / "stage2")
    assert set(model.state_dict()) == set(load_file(str(out / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.eval()(x), atol=1e-5)
    assert tuple(model.pretrained_cfg["mean"]) == (0.485, 0.456, 0.406)  # what its images were normalised with
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("library_name: timm", "license: apache-2.0", "- dbot", "- knn_top1", "- linear_top1"):
        assert line in front, line
    assert "stage 2" in card and "knn_top1: 0.42" in card and "hf-hub:ORG/dbot-vit-tiny" in card


def test_push_to_hub_uploads_the_timm_directory_with_huggingface_hub(run_dir, tmp_path, monkeypatch):
    """The network call is the library's; what it is asked to upload is ours."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload", kw["repo_id"], sorted(p.name for p in
                                                         Path(kw["folder_path"]).iterdir()))) or "https://hub/commit")
    assert main(["export", str(run_dir / "stage2"), "--out", str(tmp_path / "m"), "--format", "timm",
                 "--push-to-hub", "me/dbot-tiny"]) == 0
    assert calls == [("create", "me/dbot-tiny"), ("upload", "me/dbot-tiny", ["README.md", "config.json",
                                                                             "model.safetensors"])]


def test_a_resume_checkpoint_exports_to_timm_through_an_export_of_its_own(run_dir, tmp_path):
    last = checkpoint.latest(run_dir / "checkpoints")
    assert main(["export", str(last), "--out", str(tmp_path), "--format", "timm"]) == 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    stage2 = read_export(run_dir / "stage2")[0]  # the checkpoint of the stage's last step
    assert all(torch.equal(weights[k], stage2[f"encoder.{k}"]) for k in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_an_export_naming_weights_outside_its_folder_is_refused(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir / "stage1", tmp_path / "x")
    meta = json.loads((tmp_path / "x" / "meta.json").read_text())
    (tmp_path / "x" / "meta.json").write_text(json.dumps({**meta, "weights": "../../stage1/model.safetensors"}))
    with pytest.raises(ExportError, match="names weights '../../stage1/model.safetensors' outside the export's folder"):
        read_export(tmp_path / "x")


def test_an_export_whose_architecture_does_not_fit_its_weights_names_the_key(run_dir, tmp_path):
    import shutil

    shutil.copytree(run_dir / "stage1", tmp_path / "x")
    meta = json.loads((tmp_path / "x" / "meta.json").read_text())
    meta["encoder"]["mlp_ratio"] = 2.0
    (tmp_path / "x" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"wrong shape .*blocks.0.mlp.fc1.weight \(128, 32\) \(the architecture has \(64, 32\)\)"):
        encoder_from_export(tmp_path / "x")


def test_an_existing_export_is_never_overwritten_by_other_weights(run_dir):
    state, meta = read_export(run_dir / "stage1")
    write_export(run_dir / "stage1", state, {})  # same weights: a no-op
    state = {k: v + 1 for k, v in state.items()}
    with pytest.raises(ExportError, match="refusing to overwrite"):
        write_export(run_dir / "stage1", state, {})
    assert read_meta(run_dir / "stage1")["sha256"] == meta["sha256"]


@pytest.mark.parametrize("damage, message", [
    ("missing", "no meta.json"),
    ("no_weights", "model.safetensors is missing"),
    ("corrupt", "does not match meta.json"),
])
def test_a_missing_or_damaged_teacher_export_fails_before_training(run_dir, tmp_path, capsys, damage, message):
    import shutil
    teacher = tmp_path / "teacher"
    if damage != "missing":
        shutil.copytree(run_dir / "stage1", teacher)
    if damage == "no_weights":
        (teacher / "model.safetensors").unlink()
    if damage == "corrupt":
        (teacher / "model.safetensors").write_bytes(b"\0" * 64)
    out = tmp_path / "run"
    from helpers import tiny_args
    assert main(["pretrain", "--out", str(out), "--set", f"teacher.init={teacher}", *tiny_args()]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before the run directory was made


def test_a_beit_style_student_exports_to_timm_beit_loading_strictly_with_the_same_features(tmp_path, process_group):
    from timm.models.beit import Beit
    pretrain(tiny_config("stages.epochs=[1]", "model.family=beit", "model.decoder=false", "mask.kind=block",
                         "mask.patches=6", "mask.block_min=2"), tmp_path / "run")
    assert main(["export", str(tmp_path / "run" / "stage1"), "--out", str(tmp_path / "timm"), "--format", "timm"]) == 0
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"] == "beit_base_patch16_224"
    model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert isinstance(model, Beit)
    ours, meta = encoder_from_export(tmp_path / "run" / "stage1")
    assert meta["encoder"]["family"] == "beit"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.eval()(x), atol=1e-5)
