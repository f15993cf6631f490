"""Under bf16 autocast the residual stream stays bf16: fp32 cls / mask tokens and position
buffers must not promote it (that would run every block's elementwise work in fp32)."""

import pytest
import torch
from timm.models.beit import Block as BeitBlock
from timm.models.vision_transformer import Block

from dbot_ds.method.masking import random_masking
from dbot_ds.models import DecoderArch, vit_arch
from dbot_ds.method.student import Student
from dbot_ds.method.teacher import Teacher

BF16 = torch.bfloat16


def block_dtypes(module) -> list[tuple[torch.dtype, torch.dtype]]:
    """Records (input, output) dtypes of every transformer block in `module` from now on."""
    seen = []
    for m in module.modules():
        if isinstance(m, (Block, BeitBlock)):
            m.register_forward_hook(lambda _, args, out: seen.append((args[0].dtype, out.dtype)))
    return seen


@pytest.mark.parametrize("variant", ["decoder", "no_decoder", "beit"])
def test_student_blocks_run_in_bf16_under_autocast(variant):
    arch = vit_arch("tiny_test", img_size=32, **({"family": "beit", "layer_scale": 0.1} if variant == "beit" else {}))
    student = Student(arch, DecoderArch(width=16, depth=1, heads=2) if variant == "decoder" else None, 32)
    seen = block_dtypes(student)
    with torch.autocast("cpu", dtype=BF16):
        student(torch.randn(2, 3, 32, 32), random_masking(2, arch.num_patches, 0.75))
    assert len(seen) == arch.depth + (1 if variant == "decoder" else 0)
    assert all(d == (BF16, BF16) for d in seen), seen


def test_the_ema_teachers_fp32_weights_compute_in_bf16():
    student = Student(vit_arch("tiny_test", img_size=32), None, 32)
    teacher = Teacher(student.encoder, "ema", dtype=torch.float32, autocast=BF16)  # as the EMA policy builds it
    seen = block_dtypes(teacher)
    teacher.targets(torch.randn(2, 3, 32, 32))
    assert len(seen) == 2 and all(d == (BF16, BF16) for d in seen), seen


@pytest.mark.parametrize("ds_json, dtype", [("bench_zero1", torch.float32), ("bench_zero1_bf16", BF16)])
def test_the_plain_baseline_makes_the_deepspeed_engines_update(process_group, ds_json, dtype):
    """bf16 weights with fp32 masters and fp32 gradient accumulation, as DeepSpeed's BF16_Optimizer:
    two optimizer steps of 2 micro-batches each land on the same weights, bit for bit."""
    from helpers import tiny_config

    from dbot_ds.runtime import engine
    from dbot_ds.runtime.plain_engine import PlainEngine
    from dbot_ds.runtime.ds_config import resolve_ds_config
    from dbot_ds.method.stages import fresh_student
    from dbot_ds.method.tasks import distill_loss
    cfg = tiny_config(f"deepspeed={ds_json}")  # global 16 = 2 x micro 8: accumulation 2
    ds = resolve_ds_config(cfg, 1)
    teacher = Teacher(Student(cfg.model.encoder_arch(), None, 32).encoder, "t", dtype=dtype)
    deep = engine.build_engine(fresh_student(cfg, 1, 32), cfg, ds, torch.device("cpu"))
    plain = PlainEngine(fresh_student(cfg, 1, 32), cfg, torch.device("cpu"), dtype, accum=2)
    imgs = torch.randn(4, 8, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    for eng in (deep, plain):
        for i, batch in enumerate(imgs):
            torch.manual_seed(i)  # the same masks and drop paths for both
            eng.backward(distill_loss(eng, teacher, batch, cfg))
            eng.step()
    a, b = deep.module.state_dict(), plain.module.state_dict()
    assert all(p.dtype == dtype for p in plain.module.parameters())
    for k in a:  # bit for bit
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    deep.destroy()
