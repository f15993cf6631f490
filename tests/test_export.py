"""`dbot-ds export`: resume checkpoint -> stage export, and timm-compatible encoder weights."""

import json

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


def test_timm_export_loads_strictly_and_gives_the_same_features(run_dir, tmp_path):
    assert main(["export", str(run_dir / "stage2"), "--out", str(tmp_path), "--format", "timm"]) == 0
    kwargs = json.loads((tmp_path / "timm_config.json").read_text())["kwargs"]
    model = timm.models.vision_transformer.VisionTransformer(**kwargs).eval()
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    ours, _ = encoder_from_export(run_dir / "stage2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.eval()(x), atol=1e-5)


def test_a_resume_checkpoint_exports_to_timm_through_an_export_of_its_own(run_dir, tmp_path):
    last = checkpoint.latest(run_dir / "checkpoints")
    assert main(["export", str(last), "--out", str(tmp_path), "--format", "timm"]) == 0
    assert read_meta(tmp_path / "dbot_export")["sha256"] == read_meta(run_dir / "stage2")["sha256"]
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["pos_embed"],
                       read_export(run_dir / "stage2")[0]["encoder.pos_embed"])


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


def test_timm_export_loads_through_create_model_with_a_file_overlay(run_dir, tmp_path):
    main(["export", str(run_dir / "stage2"), "--out", str(tmp_path), "--format", "timm"])
    kwargs = json.loads((tmp_path / "timm_config.json").read_text())["kwargs"]
    model = timm.create_model("vit_base_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")), **kwargs).eval()
    ours, _ = encoder_from_export(run_dir / "stage2")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), ours.eval()(x), atol=1e-5)
    card = (tmp_path / "README.md").read_text()
    assert "stage 2" in card and "pretrained_cfg_overlay" in card


def test_a_beit_style_student_exports_to_timm_beit_loading_strictly_with_the_same_features(tmp_path, process_group):
    from timm.models.beit import Beit
    pretrain(tiny_config("stages.epochs=[1]", "model.family=beit", "model.decoder=false", "mask.kind=block",
                         "mask.patches=6", "mask.block_min=2"), tmp_path / "run")
    assert main(["export", str(tmp_path / "run" / "stage1"), "--out", str(tmp_path / "timm"), "--format", "timm"]) == 0
    config = json.loads((tmp_path / "timm" / "timm_config.json").read_text())
    assert config["architecture"] == "timm.models.beit.Beit"
    weights = load_file(str(tmp_path / "timm" / "model.safetensors"))
    model = Beit(**config["kwargs"]).eval()
    model.load_state_dict(weights, strict=True)
    overlay = timm.create_model("beit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(
        file=str(tmp_path / "timm" / "model.safetensors")), **config["kwargs"]).eval()
    ours, meta = encoder_from_export(tmp_path / "run" / "stage1")
    assert meta["encoder"]["family"] == "beit"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for theirs in (model, overlay):
            assert torch.allclose(theirs.forward_features(x), ours.eval()(x), atol=1e-5)
