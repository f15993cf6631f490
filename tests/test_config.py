import json
import re

import pytest
from helpers import PAPER_DATA

from dbot_ds.config import ConfigError, load_config
from dbot_ds.runtime.ds_config import DS_CONFIG_DIR, resolve_ds_config


def test_recipes_that_need_a_teacher_say_so():
    with pytest.raises(ConfigError, match="needs a teacher: --set teacher.init=PATH"):
        load_config("clip_vit_base", None, [PAPER_DATA])



@pytest.mark.parametrize("name", ["clip_vit_base", "clip_vit_large", "clip_vit_huge"])
def test_the_clip_recipes_are_the_authors_beit_branch(name):
    cfg = load_config(name, None, ["teacher.init=/weights/clip.safetensors", PAPER_DATA])
    # student: BEiT-style, no decoder, layer scale 0.1, drop path 0.1 for every size
    assert (cfg.model.family, cfg.model.decoder, cfg.model.layer_scale, cfg.model.drop_path) == ("beit", False, 0.1, 0.1)
    # 78 patches in blocks of >= 16, aspect 0.3..1/0.3; 1 - cos over masked patches only
    assert (cfg.mask.kind, cfg.mask.patches, cfg.mask.block_min, cfg.mask.block_aspect) == ("block", 78, 16, 0.3)
    assert (cfg.loss.kind, cfg.loss.tokens) == ("cosine", "masked")
    # target: ln_post, then CLIP's projection, no per-token normalisation; the teacher's own input norm
    t = cfg.teacher
    assert (t.final_norm, t.project, t.normalize_target, t.input_norm, t.random_depth) == (True, True, False, "auto", None)
    o = cfg.optim
    assert (o.betas, o.eps, cfg.peak_lr(), o.min_lr, o.warmup_epochs, o.grad_clip) == ((0.9, 0.98), 1e-6, 3e-3, 1e-5, 10, 3.0)
    assert (cfg.data.crop_scale, cfg.data.color_jitter, cfg.stages.epochs) == ((0.4, 1.0), 0.4, [1600])


def test_paper_defaults():
    cfg = load_config("vit_base", None, [PAPER_DATA])
    assert (cfg.mask.kind, cfg.mask.ratio, cfg.loss.kind, cfg.loss.beta, cfg.loss.tokens) == (
        "random", 0.75, "smooth_l1", 2.0, "cls_and_masked")
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.05
    assert cfg.peak_lr() == pytest.approx(2.4e-3)  # 1.5e-4 x 4096 / 256
    assert cfg.stages.epochs == [800, 800] and cfg.optim.warmup_epochs == 40 and cfg.optim.min_lr == 0
    assert not cfg.teacher.final_norm and cfg.teacher.normalize_target and not cfg.teacher.project
    assert (cfg.model.family, cfg.model.decoder_width, cfg.model.decoder_depth, cfg.model.decoder_heads) == (
        "vit", 512, 8, 16)
    assert cfg.model.resolved_drop_path() == 0.2 and cfg.data.color_jitter == 0
    assert load_config("vit_huge", None, [PAPER_DATA]).model.resolved_drop_path() == 0.3
    assert load_config("vit_large", None, [PAPER_DATA]).teacher.random_depth == 0


def test_only_vit_base_clips_gradients_as_the_authors_pretrain_md():
    clips = {name: load_config(name, None, [PAPER_DATA]).optim.grad_clip for name in ("vit_base", "vit_large", "vit_huge")}
    assert clips == {"vit_base": 3.0, "vit_large": 0.0, "vit_huge": 0.0}


def test_the_clip_teacher_of_the_default_recipe_and_table_1_recipes():
    cfg = load_config("vit_base_from_clip", None, ["teacher.init=/w/clip.pt", PAPER_DATA])
    assert (cfg.teacher.final_norm, cfg.teacher.project, cfg.teacher.normalize_target) == (True, True, False)
    assert cfg.stages.epochs == [1600] and cfg.model.decoder  # Table B7's CLIP row: 1 x 1600, asymmetric
    for name in ("vit_base_from_deit", "vit_base_from_dino", "vit_base_from_mae"):  # every stage of Table 1
        assert load_config(name, None, ["teacher.init=/w/t.pt", PAPER_DATA]).stages.epochs == [800, 800, 800]


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


@pytest.mark.parametrize("name", sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
def test_every_shipped_deepspeed_config_turns_off_the_synchronising_timer_and_reduces_in_fp32(name, process_group):
    import torch

    from dbot_ds.runtime import engine
    from dbot_ds.runtime.ds_config import fill_ds_config
    from dbot_ds.models import vit_arch
    from dbot_ds.method.student import Student
    ds = fill_ds_config(name, global_batch=8, micro_batch=8, grad_clip=0.0, world_size=1)
    assert ds["timers"] == {"throughput": {"enabled": False}} and ds["communication_data_type"] == "fp32"
    if "overlap_comm" in ds.get("zero_optimization", {}):  # "auto": only with ranks to overlap with
        assert ds["zero_optimization"]["overlap_comm"] is False
        assert fill_ds_config(name, global_batch=16, micro_batch=8, grad_clip=0.0, world_size=2)[
            "zero_optimization"]["overlap_comm"] is True
    if ds.get("bf16", {}).get("enabled") and not ds["zero_optimization"]["stage"]:
        return  # refused elsewhere (no fp32 master at ZeRO-0)
    eng = engine.initialize(Student(vit_arch("tiny_test", img_size=32), None, 32), ds, torch.device("cpu"),
                            1e-3, (0.9, 0.95), lambda m: engine.param_groups(m, 0.05))
    assert eng.communication_data_type == torch.float32 and not eng.tput_timer.config.enabled
    eng.destroy()


@pytest.mark.parametrize("override, message", [
    ("optim.lr=NaN", "optim.lr must be a finite number > 0"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("optim.base_lr=0", "optim.base_lr must be a finite number > 0"),
    ("optim.betas=[0.9,1.5]", "optim.betas must lie in"),
    ("optim.weight_decay=Infinity", "weight_decay, grad_clip and warmup_epochs must be finite"),
    ("batch.micro_batch=0", "batch.micro_batch and batch.global_batch must be >= 1"),
    ("log_every=0", "log_every must be >= 1"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"),
    ("data.num_workers=-1", "data.num_workers >= 0"),
    ("divergence.policy=retry", "divergence.policy 'retry' is not one of 'stop', 'rollback'"),
    ("data.verify=md5", "data.verify 'md5' is not one of 'size', 'sha256'"),
])
def test_values_that_would_crash_later_are_refused_up_front(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("vit_base", None, [override, PAPER_DATA])


def test_a_config_file_that_is_not_a_json_object_is_refused(tmp_path):
    f = tmp_path / "run.json"
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="holds a JSON list, not an object of sections"):
        load_config(None, f, [])


def test_the_teacher_input_norm_choices_are_the_known_normalisations():
    import typing

    from dbot_ds.config.pretrain import TeacherConfig
    from dbot_ds.input_norms import INPUT_NORMS

    choices = typing.get_args(typing.get_type_hints(TeacherConfig)["input_norm"])
    assert choices == ("auto", *INPUT_NORMS)
