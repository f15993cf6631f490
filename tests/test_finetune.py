"""`dbot-ds finetune` at tiny size: layer-decay groups in the engine, a resumable run."""

import json

import pytest
import torch
from conftest import tiny_config

from dbot_ds.config import ConfigError
from dbot_ds.export import read_meta
from dbot_ds.finetune import FinetuneConfig, build_classifier, finetune, layer_decay_groups


@pytest.fixture(scope="module")
def export_and_shards(tmp_path_factory, process_group):
    from test_shard_loader import write_shards

    from dbot_ds.train import pretrain
    root = tmp_path_factory.mktemp("ft")
    pretrain(tiny_config("stages.epochs=[1]"), root / "run")
    return root / "run" / "stage1", write_shards(root / "shards", [16, 16])


def cfg(export, manifest, *sets):
    base = dict(init=str(export), train=str(manifest), val=str(manifest), deepspeed="cpu_demo", global_batch=8,
                micro_batch=4, epochs=2, warmup_epochs=1, num_workers=0)
    for s in sets:
        k, v = s.split("=")
        base[k] = type(base[k])(v) if k in base else json.loads(v)
    return FinetuneConfig(**base)


def test_layer_decay_scales_fall_by_0_75_per_block_from_the_head_and_reach_the_engine(export_and_shards):
    from dbot_ds import engine
    from dbot_ds.ds_config import fill_ds_config
    export, manifest = export_and_shards
    model = build_classifier({**read_meta(export), "_path": str(export)}, num_classes=3, drop_path=0.1)
    groups = layer_decay_groups(model, cfg(export, manifest))
    scale = {n: g["lr_scale"] for g in groups for p in g["params"] for n, q in model.named_parameters() if p is q}
    depth = len(model.blocks)  # 2: layers 0 (embeddings), 1..2 (blocks), 3 (head)
    assert scale["head.weight"] == 1.0
    assert scale["blocks.1.mlp.fc1.weight"] == pytest.approx(0.75)
    assert scale["blocks.0.mlp.fc1.weight"] == pytest.approx(0.75 ** 2)
    assert scale["patch_embed.proj.weight"] == pytest.approx(0.75 ** (depth + 1))
    wd = {n: g["weight_decay"] for g in groups for p in g["params"] for n, q in model.named_parameters() if p is q}
    assert wd["pos_embed"] == 0 and wd["cls_token"] == 0 and wd["blocks.0.norm1.weight"] == 0
    assert wd["blocks.0.attn.qkv.weight"] == 0.05
    # through the real DeepSpeed engine, as finetune builds it: every group's lr carries its scale
    ds = fill_ds_config("cpu_demo", global_batch=4, micro_batch=4, grad_clip=0.0, world_size=1)
    eng = engine.initialize(model, ds, torch.device("cpu"), 1e-3, (0.9, 0.999), lambda m: layer_decay_groups(
        m, cfg(export, manifest)))
    engine.set_lr(eng, 0.5)
    lrs = sorted(g["lr"] for g in eng.optimizer.param_groups)
    assert lrs[0] == pytest.approx(0.5 * 0.75 ** (depth + 1)) and lrs[-1] == pytest.approx(0.5)
    assert all(g["lr"] == pytest.approx(0.5 * g["lr_scale"]) for g in eng.optimizer.param_groups)
    eng.destroy()


def test_classifier_starts_from_the_export_encoder(export_and_shards):
    from dbot_ds.teacher import encoder_from_export
    export, _ = export_and_shards
    model = build_classifier({**read_meta(export), "_path": str(export)}, num_classes=3, drop_path=0.0).eval()
    enc, _ = encoder_from_export(export)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # same blocks: timm's pre-pool tokens equal our encoder's tokens before its final norm
        assert torch.allclose(model.forward_features(x), enc.eval()(x, final_norm=False), atol=1e-5)


def test_finetune_runs_evaluates_and_resumes_to_the_same_result(export_and_shards, tmp_path):
    export, manifest = export_and_shards
    straight = finetune(cfg(export, manifest), tmp_path / "a")
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["best"] == straight
    finetune(cfg(export, manifest, "stop_at_step=3"), tmp_path / "b")
    finetune(cfg(export, manifest), tmp_path / "b")
    assert finetune(cfg(export, manifest), tmp_path / "a") == straight  # a finished run: same report
    last_a = json.loads((tmp_path / "a" / "metrics.json").read_text())["last"]
    last_b = json.loads((tmp_path / "b" / "metrics.json").read_text())["last"]
    assert last_a["loss"] == pytest.approx(last_b["loss"], rel=1e-6) and last_a["top1"] == last_b["top1"]


def test_finetune_refuses_to_resume_with_a_changed_config(export_and_shards, tmp_path):
    export, manifest = export_and_shards
    finetune(cfg(export, manifest, "stop_at_step=2"), tmp_path)
    with pytest.raises(ConfigError, match="base_lr: checkpoint 0.0005, now 0.001"):
        finetune(cfg(export, manifest, "base_lr=0.001"), tmp_path)


def test_finetune_without_its_inputs_names_them():
    with pytest.raises(ConfigError, match="--train, --val"):
        FinetuneConfig(init="x")
