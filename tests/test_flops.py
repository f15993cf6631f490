import pytest
import torch

from dbot_ds.method.flops import dbot_flops_per_image, measured_step_flops
from dbot_ds.method.losses import masked_distill_loss
from dbot_ds.method.masking import random_masking
from dbot_ds.models import DecoderArch, ViT, vit_arch
from dbot_ds.method.student import Student
from dbot_ds.method.teacher import Teacher


def _measure(arch, decoder, batch=2):
    """One training step's FLOPs (teacher forward, student forward + backward), on meta tensors."""
    with torch.device("meta"):
        student = Student(arch, decoder, arch.width)
        teacher = Teacher(ViT(arch), "meta")

    def step(imgs):
        target = teacher.targets(imgs)
        masks = random_masking(imgs.shape[0], arch.num_patches, 0.75, device="meta")
        masked_distill_loss(student(imgs, masks), target, masks.mask).backward()

    imgs = torch.empty(batch, 3, arch.img_size, arch.img_size, device="meta")
    return measured_step_flops(step, imgs) / batch


def test_vit_b_training_step_matches_the_analytic_count_and_the_guide():
    arch = vit_arch("vit_base")
    analytic = dbot_flops_per_image(arch, DecoderArch(), arch, 0.75)
    measured = _measure(arch, DecoderArch())
    assert measured == pytest.approx(analytic.total, rel=0.01)
    assert measured == pytest.approx(93.8e9, rel=0.01)  # performance.md
    assert analytic.teacher_forward == pytest.approx(35.1e9, rel=0.01)


def test_variant_without_decoder_matches_the_analytic_count():
    arch = vit_arch("vit_small", img_size=64)
    assert _measure(arch, None) == pytest.approx(dbot_flops_per_image(arch, None, arch, 0.75).total, rel=0.01)


@pytest.mark.parametrize("size, total", [("vit_large", 247.8e9), ("vit_huge", 626.5e9)])
def test_larger_models_match_the_guide(size, total):
    arch = vit_arch(size)
    assert dbot_flops_per_image(arch, DecoderArch(), arch, 0.75).total == pytest.approx(total, rel=0.01)


def test_shared_teacher_forward_counts_the_teacher_once():
    arch = vit_arch("vit_base")
    one = dbot_flops_per_image(arch, DecoderArch(), arch, 0.75)
    two = dbot_flops_per_image(arch, DecoderArch(), arch, 0.75, masks_per_image=2)
    assert two.total == pytest.approx(2 * one.total - one.teacher_forward)
