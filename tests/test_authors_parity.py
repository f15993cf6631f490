"""Parity with the authors' published code (liuxingbin/dbot: main db3b15e, beit a8105cc).

The fixtures hold what the authors' models computed on weights dbot-ds built (tiny sizes, fp32,
CPU; fixtures/authors/README.md says how). The same weights, inputs and masks go through the
pieces of our training step (distill_loss, the recipe's teacher, the importer, the masks); the
predictions, targets, loss and gradients must equal theirs.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import PAPER_DATA
from safetensors.torch import load_file

from dbot_ds.config import load_config
from dbot_ds.method.masking import Masks, block_mask, random_masking
from dbot_ds.models import DecoderArch, ViTArch, build_encoder
from dbot_ds.method.teacher import build_teacher
from dbot_ds.method.student import Student
from dbot_ds.method.teacher import TeacherWeights
from dbot_ds.weights.layouts import import_teacher, resize_grid
from dbot_ds.method.tasks import distill_loss

FIXTURES = Path(__file__).parent / "fixtures" / "authors"
TOL = dict(rtol=1e-4, atol=1e-6)


def fixture(name: str):
    return load_file(str(FIXTURES / f"{name}.safetensors")), json.loads((FIXTURES / f"{name}.json").read_text())


def under(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def assert_gradients_equal(student, expected: dict):
    ours = {k: p.grad for k, p in student.named_parameters() if p.grad is not None}
    assert set(ours) == set(expected)
    for k, g in expected.items():
        assert torch.allclose(ours[k], g, **TOL), k


def drop_rates(blocks) -> list[float]:
    return [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]


@pytest.fixture(scope="module")
def main_branch():
    return fixture("main_branch")


@pytest.fixture(scope="module")
def beit_branch():
    return fixture("beit_branch")


def test_default_recipe_predictions_targets_loss_and_gradients_equal_the_authors(main_branch):
    t, meta = main_branch
    cfg = load_config("vit_base", None, [PAPER_DATA])  # the recipe's target, loss and masking settings
    arch = ViTArch(**meta["encoder"])
    student = Student(arch, DecoderArch(**meta["decoder"]), arch.width).train()
    student.load_state_dict(under(t, "student."))
    encoder = build_encoder(arch)
    encoder.load_state_dict(under(t, "teacher."))
    teacher = build_teacher(cfg, TeacherWeights(encoder, "t", "imagenet"), torch.float32)
    masks = random_masking(2, arch.num_patches, cfg.mask.ratio,
                           generator=torch.Generator().manual_seed(meta["mask_seed"]))
    assert torch.equal(masks.mask, t["mask"])  # their torch.rand after manual_seed: the same masks

    assert torch.allclose(teacher.targets(t["imgs"]), t["target_normalized"], **TOL)
    assert torch.allclose(student(t["imgs"], masks), t["pred"], **TOL)
    loss = distill_loss(student, teacher, t["imgs"], cfg, masks)
    assert torch.allclose(loss, t["loss"][0], **TOL)
    loss.backward()
    assert_gradients_equal(student, under(t, "grad."))


def test_default_recipe_target_is_the_last_block_without_its_norm(main_branch):
    t, meta = main_branch
    encoder = build_encoder(ViTArch(**meta["encoder"]))
    encoder.load_state_dict(under(t, "teacher."))
    with torch.no_grad():
        assert torch.allclose(encoder(t["imgs"], final_norm=False), t["target_raw"], **TOL)


def test_stochastic_depth_ramps_over_the_encoder_and_separately_over_the_decoder(main_branch):
    _, meta = main_branch
    layout = meta["drop_path_layout"]  # their student: 3 encoder blocks, 4 decoder blocks, rate 0.2
    student = Student(ViTArch(width=16, depth=3, heads=2, patch_size=8, img_size=32),
                      DecoderArch(width=8, depth=4, heads=2), 16, drop_path=0.2)
    assert drop_rates(student.encoder.blocks) == layout["encoder"]
    assert drop_rates(student.decoder.blocks) == layout["decoder"]


def test_a_bigger_teachers_position_table_is_interpolated_as_the_authors(main_branch):
    """ViT-H/14 at 196 px in miniature: an 8x8 sin-cos table resampled to 7x7, not recomputed."""
    t, meta = main_branch
    encoder = build_encoder(ViTArch(**meta["big_teacher"]))
    encoder.load_state_dict(under(t, "big.teacher."))
    resized, note = resize_grid(encoder, 7)
    assert "8x8 -> 7x7" in note
    with torch.no_grad():
        assert torch.allclose(resized(t["big.imgs"], final_norm=False), t["big.tokens"], **TOL)


def test_block_masking_draws_beits_masks_from_the_same_seed(beit_branch):
    t, _ = beit_branch
    for seed, expected in enumerate(t["block_masks"]):
        mask = block_mask(14, 78, random.Random(seed), min_block=16, min_aspect=0.3)
        assert torch.equal(torch.from_numpy(mask.reshape(-1)).long(), expected), seed
        assert 70 <= mask.sum() <= 78


def clip_recipe_parts(beit_branch):
    t, meta = beit_branch
    cfg = load_config("clip_vit_base", None, ["teacher.init=/w/clip.pt", PAPER_DATA])
    arch = ViTArch(**meta["student"])
    assert (arch.family, arch.layer_scale) == (cfg.model.family, cfg.model.layer_scale)
    student = Student(arch, None, meta["target_width"]).train()
    student.load_state_dict(under(t, "student."))
    encoder, report = import_teacher(FIXTURES / "clip_teacher.pt", heads=3)  # 24 wide: no standard head count
    assert report["input_norm"] == "clip"
    teacher = build_teacher(cfg, TeacherWeights(encoder, "clip", report["input_norm"]), torch.float32)
    return t, cfg, student, teacher


def test_clip_recipe_targets_predictions_loss_and_gradients_equal_the_authors(beit_branch):
    t, cfg, student, teacher = clip_recipe_parts(beit_branch)
    masked = t["mask"].bool()
    masks = Masks(None, None, t["mask"])
    # the teacher gets the student's ImageNet-normalised images and renormalises them to CLIP's
    target = teacher.targets(t["samples"])
    assert torch.allclose(target[:, 1:], t["tokens"], **TOL)  # ln_post, proj, no normalisation
    assert torch.allclose(student(t["samples"], masks)[:, 1:][masked], t["outputs"], **TOL)
    loss = distill_loss(student, teacher, t["samples"], cfg, masks)
    assert torch.allclose(loss, t["loss"][0], **TOL)  # 1 - cos over the masked patches only
    loss.backward()
    assert_gradients_equal(student, under(t, "grad."))


def test_clip_recipe_student_stochastic_depth(beit_branch):
    _, meta = beit_branch
    arch = ViTArch(width=16, depth=4, heads=2, patch_size=8, img_size=32, family="beit", layer_scale=0.1)
    assert drop_rates(Student(arch, None, 12, drop_path=0.1).encoder.blocks) == meta["drop_path_layout"]


def test_a_clip_l14_teacher_at_196_px_is_interpolated_as_the_authors(beit_branch):
    t, _ = beit_branch
    encoder, _ = import_teacher(FIXTURES / "clip_teacher_big.pt", heads=3)
    resized, _ = resize_grid(encoder, 7)
    with torch.no_grad():
        assert torch.allclose(resized(t["big.imgs"], project=True), t["big.tokens"], **TOL)
