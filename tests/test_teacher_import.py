"""Pretrained teachers from the weight layouts people have on disk (built here with timm)."""

import re

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import QuickGELU
from timm.models.vision_transformer import VisionTransformer

from dbot_ds.weights.export import ExportError
from dbot_ds.models import vit_arch
from dbot_ds.method.teacher import Teacher
from dbot_ds.weights.layouts import import_teacher, resize_grid

TINY = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0)


def timm_vit(**kw):
    torch.manual_seed(0)
    if kw.get("pre_norm"):  # timm's CLIP towers, as CLIP: torch's LayerNorm (eps 1e-5)
        kw.setdefault("norm_layer", torch.nn.LayerNorm)
    return VisionTransformer(**{**TINY, **kw}).eval()


def same_features(model, path):
    ours, report = import_teacher(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), model.forward_features(x), atol=1e-5)
    return report


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_deit_style_with_a_head(tmp_path, suffix):
    model = timm_vit(num_classes=10)
    path = tmp_path / f"deit{suffix}"
    sd = model.state_dict()
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    report = same_features(model, path)
    assert report["layout"] == "timm" and report["ignored"] == ["head.bias", "head.weight"]


def test_original_dino_checkpoint_teacher_backbone(tmp_path):
    model = timm_vit()
    ckpt = {"teacher": {**{f"backbone.{k}": v for k, v in model.state_dict().items()},
                        "head.mlp.0.weight": torch.zeros(4, 192), "head.last_layer.weight_g": torch.ones(1, 1)},
            "epoch": 100}
    torch.save(ckpt, tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth")
    report = same_features(model, tmp_path / "dino_vitbase16_pretrain_full_checkpoint.pth")
    assert "head.mlp.0.weight" in report["ignored"]


def test_original_mae_checkpoint_with_its_decoder(tmp_path):
    model = timm_vit()
    sd = {**model.state_dict(), "mask_token": torch.zeros(1, 1, 64),
          "decoder_embed.weight": torch.zeros(64, 192), "decoder_pred.bias": torch.zeros(192)}
    torch.save({"model": sd}, tmp_path / "mae_pretrain_vit_base_full.pth")
    report = same_features(model, tmp_path / "mae_pretrain_vit_base_full.pth")
    assert {"mask_token", "decoder_embed.weight", "decoder_pred.bias"} <= set(report["ignored"])


def test_timm_clip_vit_with_pre_norm_and_no_patch_bias(tmp_path):
    model = timm_vit(pre_norm=True)
    assert model.patch_embed.proj.bias is None
    save_file(model.state_dict(), str(tmp_path / "clip.safetensors"))
    ours, _ = import_teacher(tmp_path / "clip.safetensors")
    assert ours.arch.pre_norm and not ours.arch.patch_bias
    same_features(model, tmp_path / "clip.safetensors")


def openai_layout(model) -> dict:
    """timm CLIP ViT -> OpenAI CLIP key names (the inverse of timm's converter), plus a text tower."""
    out = {"visual.proj": torch.zeros(192, 32), "token_embedding.weight": torch.zeros(10, 32),
           "ln_final.weight": torch.ones(32), "logit_scale": torch.ones(())}
    rename = [("patch_embed.proj.weight", "visual.conv1.weight"), ("norm_pre.", "visual.ln_pre."),
              ("norm.", "visual.ln_post."), (r"blocks\.(\d+)\.norm1\.", r"visual.transformer.resblocks.\1.ln_1."),
              (r"blocks\.(\d+)\.norm2\.", r"visual.transformer.resblocks.\1.ln_2."),
              (r"blocks\.(\d+)\.attn\.qkv\.weight", r"visual.transformer.resblocks.\1.attn.in_proj_weight"),
              (r"blocks\.(\d+)\.attn\.qkv\.bias", r"visual.transformer.resblocks.\1.attn.in_proj_bias"),
              (r"blocks\.(\d+)\.attn\.proj\.", r"visual.transformer.resblocks.\1.attn.out_proj."),
              (r"blocks\.(\d+)\.mlp\.fc1\.", r"visual.transformer.resblocks.\1.mlp.c_fc."),
              (r"blocks\.(\d+)\.mlp\.fc2\.", r"visual.transformer.resblocks.\1.mlp.c_proj.")]
    for k, v in model.state_dict().items():
        if k == "cls_token":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "pos_embed":
            out["visual.positional_embedding"] = v[0]
        else:
            for pat, rep in rename:
                if re.match(pat, k):
                    out[re.sub("^" + pat, rep, k)] = v
                    break
    return out


def test_openai_clip_visual_tower_with_its_projection_sees_clip_normalised_images(tmp_path):
    model = timm_vit(pre_norm=True, act_layer=QuickGELU)
    sd = openai_layout(model)
    sd["visual.proj"] = torch.randn(192, 32)  # OpenAI's layout: x @ proj
    torch.save(sd, tmp_path / "ViT-B-16.pt")
    report = same_features(model, tmp_path / "ViT-B-16.pt")
    assert report["layout"] == "openai_clip" and report["converted"] == len(model.state_dict()) + 1
    assert report["input_norm"] == "clip" and report["projection"] == 32
    assert "token_embedding.weight" in report["ignored"] and "visual.proj" not in report["ignored"]
    ours, _ = import_teacher(tmp_path / "ViT-B-16.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the CLIP target: every token through ln_post, then the projection
        expected = model.forward_features(x) @ sd["visual.proj"]
        assert torch.allclose(ours.eval()(x, project=True), expected, atol=1e-5)


def test_a_timm_clip_tower_keeps_its_head_as_clips_projection(tmp_path):
    model = timm_vit(pre_norm=True, num_classes=32)  # timm writes CLIP's proj as head.weight
    with torch.no_grad():
        model.head.bias.zero_()
    save_file(model.state_dict(), str(tmp_path / "clip.safetensors"))
    ours, report = import_teacher(tmp_path / "clip.safetensors")
    assert report["input_norm"] == "clip" and report["projection"] == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x, project=True), model.head(model.forward_features(x)), atol=1e-5)


def test_an_imagenet_teacher_has_no_projection_and_sees_imagenet_normalised_images(tmp_path):
    save_file(timm_vit(num_classes=10).state_dict(), str(tmp_path / "deit.safetensors"))
    ours, report = import_teacher(tmp_path / "deit.safetensors")
    assert report["input_norm"] == "imagenet" and report["projection"] is None and ours.proj is None


def test_a_fine_tuned_checkpoint_with_average_pooling_uses_fc_norm_as_its_final_norm(tmp_path):
    model = timm_vit(num_classes=10, global_pool="avg")  # MAE-style fine-tuned: fc_norm, no norm
    assert "norm.weight" not in model.state_dict()
    save_file(model.state_dict(), str(tmp_path / "ft.safetensors"))
    ours, report = import_teacher(tmp_path / "ft.safetensors")
    assert torch.equal(ours.norm.weight, model.fc_norm.weight) and "fc_norm.weight" not in report["ignored"]


def test_a_bigger_patch_teacher_is_put_on_the_student_grid():
    """A /14 teacher for a 224 px /16 student gets 196 px inputs: 14x14 tokens each."""
    teacher_arch = vit_arch("vit_huge")
    student_arch = vit_arch("vit_base")
    assert student_arch.grid * teacher_arch.patch_size == 196
    small = dict(width=64, depth=1, heads=2)  # the arithmetic only; keep it cheap
    import dataclasses
    from dbot_ds.models import ViT
    enc = ViT(dataclasses.replace(teacher_arch, **small))  # 16x16 grid at 224
    resized, note = resize_grid(enc, student_arch.grid)
    assert resized.arch.img_size == 196 and resized.arch.grid == 14 and "16x16 -> 14x14" in note
    targets = Teacher(resized, "t").targets(torch.randn(1, 3, 224, 224))
    assert targets.shape == (1, 1 + 196, 64)


def test_missing_weights_are_named(tmp_path):
    sd = timm_vit().state_dict()
    del sd["blocks.1.mlp.fc2.weight"], sd["norm.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ExportError, match="lacks weights the teacher needs: blocks.1.mlp.fc2.weight, norm.weight"):
        import_teacher(tmp_path / "broken.safetensors")


def test_a_file_of_another_architecture_is_refused(tmp_path):
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)},
              str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ExportError, match="unrecognised teacher layout"):
        import_teacher(tmp_path / "resnet.safetensors")


def test_a_pickle_with_code_is_not_loaded(tmp_path):
    torch.save({"model": timm_vit().state_dict(), "args": torch.nn.Linear(2, 2)}, tmp_path / "evil.pth")
    with pytest.raises(ExportError, match="not loadable as weights only"):
        import_teacher(tmp_path / "evil.pth")


def test_a_width_without_a_standard_head_count_needs_it_stated(tmp_path):
    model = timm_vit(embed_dim=48, num_heads=4)
    save_file(model.state_dict(), str(tmp_path / "odd.safetensors"))
    with pytest.raises(ExportError, match="48-wide ViT has no standard head count.*teacher.heads=N"):
        import_teacher(tmp_path / "odd.safetensors")
    assert import_teacher(tmp_path / "odd.safetensors", heads=4)[0].arch.heads == 4
    save_file(model.state_dict(), str(tmp_path / "stated.safetensors"), metadata={"num_heads": "4"})
    same_features(model, tmp_path / "stated.safetensors")  # the count from the file's metadata


def test_broken_or_odd_teacher_files_are_refused_with_the_reason(tmp_path):
    """What a red team handed the importer: each a one-line ExportError, never a traceback."""
    sd = timm_vit().state_dict()
    cases = {}
    cases["truncated.safetensors"] = lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    cases["no_pos.safetensors"] = lambda p: save_file({k: v for k, v in sd.items() if k != "pos_embed"}, str(p))
    cases["wrong_shape.safetensors"] = lambda p: save_file(
        {**sd, "blocks.1.mlp.fc1.weight": torch.zeros(10, 192)}, str(p))
    cases["a_list.pth"] = lambda p: torch.save([torch.zeros(3)], p)
    messages = {"truncated.safetensors": "not a readable safetensors file",
                "no_pos.safetensors": "lack pos_embed",
                "wrong_shape.safetensors": r"wrong shape .*blocks.1.mlp.fc1.weight \(10, 192\)",
                "a_list.pth": "holds a list, not a state dict"}
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(ExportError, match=messages[name]):
            import_teacher(tmp_path / name)


def test_a_head_count_that_does_not_divide_the_width_is_refused(tmp_path):
    save_file(timm_vit().state_dict(), str(tmp_path / "t.safetensors"))
    with pytest.raises(ExportError, match="describe no valid ViT: width 192 is not divisible by heads 5"):
        import_teacher(tmp_path / "t.safetensors", heads=5)
