import torch

from dbot_ds.method.losses import masked_distill_loss, normalize_tokens


def _case():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 1 + 8, 4, generator=g), torch.randn(2, 1 + 8, 4, generator=g)
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1  # positions 0..5 masked, 6..7 visible
    return pred, target, mask


def test_visible_tokens_do_not_count():
    pred, target, mask = _case()
    base = masked_distill_loss(pred, target, mask)
    pred2 = pred.clone()
    pred2[:, 1 + 6:] += 100.0  # change only the visible tokens' predictions
    assert torch.equal(masked_distill_loss(pred2, target, mask), base)


def test_masked_tokens_and_the_cls_token_count():
    pred, target, mask = _case()
    base = masked_distill_loss(pred, target, mask)
    for position in (0, 1):  # cls, then the first masked patch
        pred2 = pred.clone()
        pred2[:, position] += 1.0
        assert masked_distill_loss(pred2, target, mask) != base


def test_smooth_l1_is_averaged_over_cls_and_masked_tokens():
    pred, target, mask = _case()
    per_token = torch.nn.functional.smooth_l1_loss(pred, target, reduction="none", beta=2.0).mean(-1)
    expected = per_token[:, :7].mean()  # cls + 6 masked of each image
    assert torch.allclose(masked_distill_loss(pred, target, mask, beta=2.0), expected)


def test_cosine_loss_is_one_minus_cos_zero_for_aligned_and_two_for_opposite_predictions():
    _, target, mask = _case()
    assert torch.allclose(masked_distill_loss(3 * target, target, mask, kind="cosine"), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(masked_distill_loss(-target, target, mask, kind="cosine"), torch.tensor(2.0))


def test_the_clip_recipe_loss_counts_masked_patches_only_not_the_cls_token():
    pred, target, mask = _case()
    base = masked_distill_loss(pred, target, mask, kind="cosine", tokens="masked")
    pred2 = pred.clone()
    pred2[:, 0] += 5.0  # the cls token
    assert torch.equal(masked_distill_loss(pred2, target, mask, kind="cosine", tokens="masked"), base)
    per_token = 1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1, eps=1e-6)
    assert torch.allclose(base, per_token[:, 1:7].mean())  # the 6 masked patches of each image


def test_target_normalisation_uses_the_unbiased_variance_as_the_authors_norm_feature_loss():
    t = torch.randn(2, 5, 64, dtype=torch.float64) * 7 + 3
    expected = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=True) + 1e-6) ** 0.5
    assert torch.allclose(normalize_tokens(t), expected, atol=1e-12)
    assert torch.allclose(normalize_tokens(t).var(-1, unbiased=True), torch.ones(2, 5, dtype=torch.float64))
