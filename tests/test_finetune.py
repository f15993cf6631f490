"""`dbot-ds finetune` at tiny size: the classifier, layer-decay groups in the engine, presets,
a resumable run through the shared Trainer."""

import json

import pytest
import torch
from helpers import tiny_export, write_shards

from dbot_ds.commands.finetune import finetune
from dbot_ds.config import ConfigError, load_finetune
from dbot_ds.method.classifier import build_classifier, layer_decay_groups
from dbot_ds.weights.export import encoder_from_export

# 32 labelled images, global batch 8 as 2 micro-batches of 4: 4 steps per epoch
TINY_FINETUNE = ["deepspeed=cpu_demo", "batch.global_batch=8", "batch.micro_batch=4", "epochs=2",
                 "optim.warmup_epochs=1", "data.num_workers=0"]


@pytest.fixture(scope="module")
def export_and_shards(tmp_path_factory, process_group):
    root = tmp_path_factory.mktemp("ft")
    return tiny_export(root), write_shards(root / "shards", [16, 16])


def cfg(export, manifest, *sets, recipe=None):
    return load_finetune(recipe, None, [*TINY_FINETUNE, *sets], init=str(export),
                         data={"train": str(manifest), "val": str(manifest)})


def test_layer_decay_scales_fall_by_0_75_per_block_from_the_head_and_reach_the_engine(export_and_shards):
    from dbot_ds.runtime import engine
    from dbot_ds.runtime.ds_config import fill_ds_config
    export, manifest = export_and_shards
    model = build_classifier(encoder_from_export(export)[0], num_classes=3, drop_path=0.1)
    groups = layer_decay_groups(model, 0.05, 0.75)
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
    eng = engine.build_engine(model, cfg(export, manifest), ds, torch.device("cpu"),
                              groups=lambda m: layer_decay_groups(m, 0.05, 0.75))
    engine.set_lr(eng, 0.5)
    lrs = sorted(g["lr"] for g in eng.optimizer.param_groups)
    assert lrs[0] == pytest.approx(0.5 * 0.75 ** (depth + 1)) and lrs[-1] == pytest.approx(0.5)
    assert all(g["lr"] == pytest.approx(0.5 * g["lr_scale"]) for g in eng.optimizer.param_groups)
    eng.destroy()


def test_classifier_starts_from_the_export_encoder(export_and_shards):
    export, _ = export_and_shards
    model = build_classifier(encoder_from_export(export)[0], num_classes=3, drop_path=0.0).eval()
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
    with pytest.raises(ConfigError, match="optim.base_lr: checkpoint 0.0005, now 0.001"):
        finetune(cfg(export, manifest, "optim.base_lr=0.001"), tmp_path)


def test_finetune_without_its_inputs_names_them():
    with pytest.raises(ConfigError, match="--train, --val"):
        load_finetune(init="x")


def test_the_first_configs_flat_keys_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="'base_lr' is now 'optim.base_lr', 'micro_batch' is now 'batch.micro_batch'"):
        old = load_finetune("vit_base", None, ["base_lr=1e-3", "micro_batch=64", "mixup=0"], init="x",
                            data={"train": "t", "val": "v"})
    assert (old.optim.base_lr, old.batch.micro_batch, old.augment.mixup) == (1e-3, 64, 0)


def test_presets_carry_the_authors_released_settings_and_the_papers_table_a2():
    def preset(name, *sets):
        return load_finetune(name, None, list(sets), init="x", data={"train": "t", "val": "v"})

    b = preset("vit_base")
    assert (b.epochs, b.peak_lr(), b.optim.layer_decay, b.model.drop_path, b.optim.grad_clip) == \
        (100, pytest.approx(1.2e-3), 0.65, 0.1, 0)
    a = b.augment
    assert (a.reprob, a.remode, b.model.head_init_std, a.mixup, a.cutmix, a.smoothing) == \
        (0.25, "pixel", 0.01, 0.8, 1.0, 0.1)
    large, huge = preset("vit_large"), preset("vit_huge")
    assert (large.epochs, large.optim.layer_decay, large.model.drop_path, large.optim.grad_clip) == (50, 0.75, 0.25, 1.0)
    assert (huge.epochs, huge.optim.layer_decay, huge.model.drop_path) == (50, 0.75, 0.3)
    clip = preset("clip_vit_base")
    assert (clip.peak_lr(), clip.optim.layer_decay, clip.model.drop_path, clip.optim.warmup_epochs) == \
        (2e-4, 0.65, 0.1, 20)
    assert [preset(f"clip_vit_{s}").model.drop_path for s in ("large", "huge")] == [0.2, 0.3]
    paper = preset("vit_base_paper")  # Table A2: peak 2e-3 at 1024, layer decay 0.75, drop path 0.2
    assert (paper.peak_lr(), paper.optim.layer_decay, paper.model.drop_path) == (pytest.approx(2e-3), 0.75, 0.2)
    assert preset("vit_base", "batch.global_batch=2048").peak_lr() == pytest.approx(2.4e-3)  # base_lr scales
    assert preset("clip_vit_base", "batch.global_batch=2048").peak_lr() == 2e-4  # an absolute lr does not
    with pytest.raises(ConfigError, match="unknown fine-tuning recipe"):
        preset("vit_giant")


def test_the_head_starts_small_as_in_the_authors_scripts(export_and_shards):
    export, _ = export_and_shards
    model = build_classifier(encoder_from_export(export)[0], num_classes=200, drop_path=0.0, head_init_std=0.01)
    assert model.head.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_a_clip_preset_refuses_an_mae_style_export(export_and_shards, tmp_path):
    export, manifest = export_and_shards
    with pytest.raises(ConfigError, match="use a vit_\\* recipe"):
        finetune(cfg(export, manifest, recipe="clip_vit_base"), tmp_path)


@pytest.fixture(scope="module")
def beit_export(tmp_path_factory, process_group):
    """A tiny BEiT-style student as the CLIP recipe trains it (random teacher, block masks)."""
    return tiny_export(tmp_path_factory.mktemp("beit"), "model.family=beit", "model.decoder=false",
                       "mask.kind=block", "mask.patches=6", "mask.block_min=2", "loss.kind=cosine",
                       "loss.tokens=masked")


def test_a_beit_style_student_fine_tunes_with_a_relative_bias_per_block_from_the_shared_one(
        beit_export, export_and_shards, tmp_path):
    from timm.models.beit import Beit

    model = build_classifier(encoder_from_export(beit_export)[0], num_classes=3, drop_path=0.0).eval()
    assert isinstance(model, Beit) and model.rel_pos_bias is None and model.pos_embed is None
    enc, _ = encoder_from_export(beit_export)
    shared = enc.rel_pos_bias.relative_position_bias_table
    assert all(torch.equal(b.attn.relative_position_bias_table, shared) for b in model.blocks)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), enc.eval()(x, final_norm=False), atol=1e-5)
    _, manifest = export_and_shards
    result = finetune(cfg(beit_export, manifest, "epochs=1", "optim.warmup_epochs=0", recipe="clip_vit_base"),
                      tmp_path)
    assert 0 <= result["top1"] <= 1


def test_supervised_training_from_the_random_teacher_leaves_a_classifier_usable_as_a_teacher(
        export_and_shards, tmp_path):
    """`teacher:<export>` fine-tunes the random teacher itself (supervised from scratch); the
    finished run's model.safetensors (timm names) then imports as a teacher or probe encoder."""
    from safetensors.torch import load_file

    from dbot_ds.weights.sources import load_encoder
    export, manifest = export_and_shards
    finetune(cfg(f"teacher:{export}", manifest, "epochs=1", "optim.warmup_epochs=0"), tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {"head.weight", "fc_norm.weight", "pos_embed"} <= set(weights)
    encoder = load_encoder(str(tmp_path / "model.safetensors"))
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"])
    assert torch.equal(encoder.norm.weight, weights["fc_norm.weight"])  # the pooled features' norm
    assert not torch.equal(encoder.blocks[0].attn.qkv.weight, load_encoder(f"teacher:{export}").blocks[0].attn.qkv.weight)


def test_mixing_turned_off_with_the_first_releases_keys_trains_on_hard_labels(export_and_shards, tmp_path):
    import subprocess
    import sys

    from helpers import subprocess_env

    export, manifest = export_and_shards
    args = ["finetune", str(export), "--train", str(manifest), "--val", str(manifest), "--out", str(tmp_path),
            *[a for s in (*TINY_FINETUNE, "epochs=1", "optim.warmup_epochs=0", "mixup=0", "cutmix=0")
              for a in ("--set", s)]]
    r = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "dbot_ds.cli", *args],
                       capture_output=True, text=True, env=subprocess_env())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'mixup' is now 'augment.mixup'" in r.stderr and "best top-1" in r.stdout
    assert json.loads((tmp_path / "config.json").read_text())["augment"]["mixup"] == 0
