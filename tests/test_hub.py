"""Encoders from the Hugging Face Hub and timm's zoo on a node without network: resolved by timm
and huggingface_hub from a local cache in the library's own layout (HF_HUB_OFFLINE=1)."""

import shutil

import pytest
import timm
import torch
from helpers import tiny_export

from dbot_ds.cli import main
from dbot_ds.weights.export import ExportError, encoder_from_export
from dbot_ds.weights.sources import load_encoder

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_id: str, files_from) -> None:
    """What huggingface_hub's download leaves: models--ORG--NAME/{refs/main, snapshots/REV/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    shutil.copytree(files_from, repo / "snapshots" / REVISION)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))  # read at import: as a fresh process would
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def exported(tmp_path_factory, process_group):
    root = tmp_path_factory.mktemp("hub")
    export = tiny_export(root)
    assert main(["export", str(export), "--out", str(root / "timm"), "--format", "timm"]) == 0
    return export, root / "timm"


def test_an_export_pushed_to_the_hub_comes_back_as_the_same_encoder_from_the_cache(exported, offline_cache):
    export, model_dir = exported
    cache_repo(offline_cache, "someone/dbot-tiny", model_dir)
    theirs, ours = load_encoder("hf-hub:someone/dbot-tiny"), encoder_from_export(export)[0]
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())
    local = load_encoder(f"local-dir:{model_dir}")
    assert all(torch.equal(local.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_a_timm_name_resolves_to_its_pretrained_weights_in_the_cache(offline_cache, tmp_path):
    from timm.models import save_for_hf

    name = "deit_tiny_patch16_224"  # a ViT-Ti trained on ImageNet-normalised images
    model = timm.create_model(name, pretrained=False)  # with its classifier, as the zoo's weights
    save_for_hf(model, str(tmp_path / "weights"), safe_serialization=True)
    cache_repo(offline_cache, model.pretrained_cfg["hf_hub_id"], tmp_path / "weights")
    encoder = load_encoder(f"timm:{name}")
    assert (encoder.arch.width, encoder.arch.depth, encoder.arch.heads) == (192, 12, 3)
    assert torch.equal(encoder.state_dict()["blocks.3.mlp.fc1.weight"], model.state_dict()["blocks.3.mlp.fc1.weight"])


def test_a_timm_augreg_model_keeps_its_own_input_normalisation(offline_cache, tmp_path):
    from timm.models import save_for_hf

    from dbot_ds.weights.hub import import_hub

    name = "vit_tiny_patch16_224"  # augreg: images normalised to mean = std = 0.5
    model = timm.create_model(name, pretrained=False)
    save_for_hf(model, str(tmp_path / "weights"), safe_serialization=True)
    cache_repo(offline_cache, model.pretrained_cfg["hf_hub_id"], tmp_path / "weights")
    _, report = import_hub(f"timm:{name}")
    assert report["input_norm"] == "inception"


def test_a_model_missing_from_the_offline_cache_says_how_to_fetch_it(offline_cache):
    with pytest.raises(ExportError, match=r"hf-hub:someone/absent: its weights are neither in the local Hugging "
                                          r"Face cache.*timm.create_model\('hf-hub:someone/absent', pretrained=True\)"):
        load_encoder("hf-hub:someone/absent")
    with pytest.raises(ExportError, match="timm:no_such_model: timm cannot load it"):
        load_encoder("timm:no_such_model")


def test_a_hub_teacher_is_stage_ones_teacher(exported, offline_cache, process_group, tmp_path):
    from helpers import tiny_config

    from dbot_ds.weights.sources import initial_teacher

    export, model_dir = exported
    cache_repo(offline_cache, "someone/dbot-tiny", model_dir)
    teacher = initial_teacher(tiny_config("teacher.init=hf-hub:someone/dbot-tiny"), verbose=False)
    assert teacher.input_norm == "imagenet"  # from the model's pretrained_cfg
    ours = encoder_from_export(export)[0]
    assert torch.equal(teacher.encoder.blocks[0].attn.qkv.weight, ours.blocks[0].attn.qkv.weight)
