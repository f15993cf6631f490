import torch

from dbot_ds.losses import masked_distill_loss, normalize_tokens


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


def test_negative_cosine_is_minus_one_for_aligned_predictions():
    _, target, mask = _case()
    loss = masked_distill_loss(3 * target, target, mask, kind="cosine")
    assert torch.allclose(loss, torch.tensor(-1.0))


def test_target_normalisation_has_zero_mean_unit_variance_per_token():
    t = normalize_tokens(torch.randn(2, 5, 64) * 7 + 3)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-3)
