import random

import pytest
import timm
import torch

from dbot_ds.method.masking import random_masking
from dbot_ds.models import DecoderArch, ViT, vit_arch
from dbot_ds.models.pos_embed import sincos_2d
from dbot_ds.method.student import Student
from dbot_ds.method.teacher import random_encoder, random_teacher_arch


def _timm_vit(arch):
    return timm.models.vision_transformer.VisionTransformer(
        img_size=arch.img_size, patch_size=arch.patch_size, embed_dim=arch.width, depth=arch.depth,
        num_heads=arch.heads, mlp_ratio=arch.mlp_ratio, num_classes=0)


def test_encoder_state_dict_loads_strictly_into_timm_and_gives_the_same_features():
    arch = vit_arch("vit_small", img_size=64)
    ours = random_encoder(arch, seed=3).eval()
    theirs = _timm_vit(arch).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs.forward_features(x), atol=1e-5)


def test_every_named_size_builds_with_its_paper_shape():
    expected = {"vit_base": (768, 12, 16, 196), "vit_large": (1024, 24, 16, 196),
                "vit_huge": (1280, 32, 14, 256)}
    for name, (width, depth, patch, patches) in expected.items():
        a = vit_arch(name)
        assert (a.width, a.depth, a.patch_size, a.num_patches) == (width, depth, patch, patches)


def test_position_embedding_is_fixed_sincos_and_not_learned():
    enc = ViT(vit_arch("tiny_test", img_size=32))
    assert "pos_embed" not in dict(enc.named_parameters())
    assert torch.equal(enc.pos_embed, sincos_2d(32, 4))
    assert torch.equal(enc.pos_embed[0, 0], torch.zeros(32))  # the cls position


def test_linear_layers_are_xavier_uniform():
    enc = ViT(vit_arch("vit_small", img_size=32))
    w = enc.blocks[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.equal(enc.blocks[0].mlp.fc1.bias, torch.zeros_like(enc.blocks[0].mlp.fc1.bias))


def test_depth0_teacher_is_patch_embedding_plus_position():
    arch = random_teacher_arch(vit_arch("tiny_test", img_size=32), depth=0)
    enc = random_encoder(arch, seed=0)
    x = torch.randn(1, 3, 32, 32)
    expected = enc.patch_embed(x) + enc.pos_embed[:, 1:]
    assert len(enc.blocks) == 0
    assert torch.allclose(enc(x, final_norm=False)[:, 1:], expected)


def test_student_predicts_every_token_at_the_teacher_width_in_both_variants():
    arch = vit_arch("tiny_test", img_size=32)
    masks = random_masking(2, arch.num_patches, 0.75)
    x = torch.randn(2, 3, 32, 32)
    for decoder in (DecoderArch(width=16, depth=1, heads=2), None):
        out = Student(arch, decoder, target_width=48)(x, masks)
        assert out.shape == (2, 1 + arch.num_patches, 48)


def test_asymmetric_student_encoder_sees_only_visible_patches():
    arch = vit_arch("tiny_test", img_size=32)
    student = Student(arch, DecoderArch(width=16, depth=1, heads=2), 32).eval()
    masks = random_masking(1, arch.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 32, 32)
    masked_patch = int(masks.mask[0].nonzero()[0])
    row, col = divmod(masked_patch, arch.grid)
    y = x.clone()
    y[..., row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 5.0  # change a masked patch only
    with torch.no_grad():
        assert torch.equal(student(x, masks), student(y, masks))


def beit_arch(**kw):
    return vit_arch("tiny_test", img_size=32, family="beit", layer_scale=0.1, **kw)


def test_beit_style_student_is_initialised_as_the_authors_beit_code():
    from dbot_ds.models import BeitViT
    torch.manual_seed(0)
    student = Student(beit_arch(), None, target_width=24)
    enc = student.encoder
    assert isinstance(enc, BeitViT) and not hasattr(enc, "pos_embed")  # positions live in one shared bias
    linears = [m.weight for m in student.modules() if isinstance(m, torch.nn.Linear)]
    assert all(w.abs().max() <= 0.02 for w in linears)  # truncated normal(0.02) at +-1 std
    assert enc.patch_embed.proj.weight.abs().max() <= 0.02 and student.mask_token.abs().max() <= 0.02
    for layer, block in enumerate(enc.blocks, start=1):  # output projections rescaled by depth
        bound = 0.02 / (2 * layer) ** 0.5
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert 0.9 * bound < w.abs().max() <= bound
        assert torch.equal(block.gamma_1, torch.full_like(block.gamma_1, 0.1))
        assert not block.attn.q_bias.any() and not block.attn.v_bias.any()
        assert block.attn.relative_position_bias_table is None  # no per-block table: the shared one
    assert not enc.rel_pos_bias.relative_position_bias_table.any()


def test_beit_style_encoder_loads_strictly_into_timm_beit_and_gives_the_same_features():
    from timm.models.beit import Beit

    from dbot_ds.method.classifier import timm_kwargs
    arch = beit_arch()
    ours = Student(arch, None, 8).encoder.eval()
    with torch.no_grad():  # non-trivial layer scales and relative biases
        for b in ours.blocks:
            b.gamma_1.uniform_(0.5, 1.5)
        ours.rel_pos_bias.relative_position_bias_table.normal_()
    theirs = Beit(**timm_kwargs(arch.to_dict())).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs.forward_features(x), atol=1e-5)


def test_weight_decay_follows_the_authors_groups():
    """main branch (timm add_weight_decay): every >1-D tensor decays, the cls and mask tokens too;
    beit branch: the cls token is skipped, the mask token and relative bias table decay."""
    from dbot_ds.runtime.engine import param_groups

    def decayed(model):
        groups = param_groups(model, 0.05)
        ids = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
        return {n for n, p in model.named_parameters() if id(p) in ids}

    mae = decayed(Student(vit_arch("tiny_test", img_size=32), DecoderArch(width=16, depth=1, heads=2), 32))
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.blocks.0.attn.qkv.weight"} <= mae
    assert not any(n.endswith(".bias") or "norm" in n for n in mae)
    beit = decayed(Student(beit_arch(), None, 32))
    assert {"mask_token", "encoder.rel_pos_bias.relative_position_bias_table"} <= beit
    assert "encoder.cls_token" not in beit and not any("gamma" in n or n.endswith("_bias") for n in beit)


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    """Per-block recomputation replays drop path's random draws: the same numbers, fp32 CPU."""
    from dbot_ds.method.masking import block_masking

    arch = vit_arch("tiny_test", img_size=32, family=family, layer_scale=0.1 if family == "beit" else None)
    decoder = DecoderArch(width=32, depth=2, heads=2) if family == "vit" else None
    torch.manual_seed(0)
    student = Student(arch, decoder, 24, drop_path=0.3).train()
    imgs = torch.randn(4, 3, 32, 32)
    masks = random_masking(4, arch.num_patches, 0.75, generator=torch.Generator().manual_seed(1)) \
        if family == "vit" else block_masking(4, arch.grid, 6, random.Random(1), min_block=2)
    blocks = [*student.encoder.blocks, *(student.decoder.blocks if decoder else [])]
    runs = []  # block calls per step: twice each (forward, then recomputed in backward) when on
    for b in blocks:  # a pre-hook: the recompute stops early, before a forward hook would run
        b.register_forward_pre_hook(lambda *_: runs.append(1))
    results = []
    for on in (False, True):
        student.set_grad_checkpointing(on)
        student.zero_grad()
        runs.clear()
        torch.manual_seed(5)  # the same drop-path draws
        loss = student(imgs, masks).square().mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
        assert len(runs) == len(blocks) * (2 if on else 1)
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    assert torch.equal(plain_loss, ckpt_loss)
    assert all(torch.equal(plain[n], ckpt[n]) for n in plain)
