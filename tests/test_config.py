import json

import pytest
from conftest import PAPER_DATA

from dbot_ds.config import ConfigError, load_config
from dbot_ds.ds_config import resolve_ds_config


def test_recipes_that_need_a_teacher_say_so():
    with pytest.raises(ConfigError, match="needs a teacher: --set teacher.init=PATH"):
        load_config("clip_vit_base", None, [PAPER_DATA])
    cfg = load_config("clip_vit_base", None, ["teacher.init=/weights/clip.safetensors", PAPER_DATA])
    assert (cfg.model.decoder, cfg.loss.kind, cfg.mask.ratio, cfg.teacher.final_norm) == (False, "cosine", 0.4, True)
    assert cfg.optim.betas == (0.9, 0.98) and cfg.peak_lr() == 3e-3 and cfg.optim.warmup_epochs == 10
    assert cfg.data.crop_scale == (0.4, 1.0) and cfg.model.drop_path == 0.1 and cfg.stages.epochs == [1600]


def test_paper_defaults():
    cfg = load_config("vit_base", None, [PAPER_DATA])
    assert (cfg.mask.ratio, cfg.loss.kind, cfg.loss.beta) == (0.75, "smooth_l1", 2.0)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.05
    assert cfg.peak_lr() == pytest.approx(2.4e-3)  # 1.5e-4 x 4096 / 256
    assert cfg.stages.epochs == [800, 800] and cfg.optim.warmup_epochs == 40
    assert not cfg.teacher.final_norm and cfg.teacher.normalize_target
    assert (cfg.model.decoder_width, cfg.model.decoder_depth, cfg.model.decoder_heads) == (512, 8, 16)
    assert cfg.model.resolved_drop_path() == 0.2
    assert load_config("vit_huge", None, [PAPER_DATA]).model.resolved_drop_path() == 0.3
    assert load_config("vit_large", None, [PAPER_DATA]).teacher.random_depth == 0


def test_set_overrides_and_a_config_file(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"mask": {"ratio": 0.8}, "stages": {"epochs": [533, 533, 533]}}))
    cfg = load_config("vit_base", f, ["optim.betas=[0.9,0.98]", "teacher.final_norm=true", PAPER_DATA])
    assert cfg.mask.ratio == 0.8 and cfg.stages.epochs == [533, 533, 533]
    assert cfg.optim.betas == (0.9, 0.98) and cfg.teacher.final_norm is True


@pytest.mark.parametrize("override, message", [
    ("bogus=1", "unknown config key.*bogus"),
    ("optim.learning_rate=1", "unknown config key.*optim.learning_rate"),
    ("mask.ratio=1.2", "mask ratio must be in"),
    ("mask.ratio=0", "mask ratio must be in"),
    ("mask.ratio=abc", "mask.ratio must be float"),
    ("stages.epochs=[]", "stages.epochs"),
    ("loss.kind=l2", "loss.kind"),
    ("teacher.update=ema", "one stage"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("vit_base", None, [override, PAPER_DATA])


def test_impossible_batch_arithmetic_says_what_fits():
    cfg = load_config("vit_base", None, [PAPER_DATA])  # 4096 global, 256 micro
    with pytest.raises(ConfigError, match=r"impossible batch arithmetic.*micro_batch 256 x world size 32"):
        resolve_ds_config(cfg, world_size=32)
    assert resolve_ds_config(cfg, world_size=8)["gradient_accumulation_steps"] == 2


def test_ds_json_values_that_contradict_the_run_config_are_all_listed(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 8,
                              "gradient_clipping": "auto", "optimizer": {"type": "AdamW"},
                              "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = load_config("vit_base", None, [f"deepspeed={ds}", PAPER_DATA])
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(cfg, world_size=8)
    text = str(e.value)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "optimizer"):
        assert key in text
    assert "gradient_clipping" not in text  # "auto" is filled, not a conflict


def test_ds_json_owns_zero_and_bf16_the_run_config_owns_batches():
    ds = resolve_ds_config(load_config("vit_large", None, [PAPER_DATA]), world_size=8)
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is True
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (4096, 128, 4)


def test_bf16_with_zero0_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="ZeRO stage 0"):
        resolve_ds_config(load_config("vit_base", None, [f"deepspeed={ds}", PAPER_DATA]), world_size=8)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known recipes: demo"):
        load_config("vit_giant")


def test_paper_recipes_need_their_data_named():
    with pytest.raises(ConfigError, match="data.source=shards needs data.shards"):
        load_config("vit_base")
