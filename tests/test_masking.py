import pytest
import torch

from dbot_ds.method.masking import random_masking
from dbot_ds.models.sizes import num_visible


def test_keeps_a_quarter_of_the_patches_and_marks_the_rest_masked():
    m = random_masking(4, 196, 0.75, generator=torch.Generator().manual_seed(0))
    assert m.ids_keep.shape == (4, 49)
    assert m.mask.shape == (4, 196)
    assert (m.mask.sum(1) == 147).all()
    # the kept ids are exactly the unmasked positions
    for b in range(4):
        assert set(m.ids_keep[b].tolist()) == set((m.mask[b] == 0).nonzero().flatten().tolist())


def test_restore_inverts_the_shuffle():
    m = random_masking(3, 64, 0.5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 64, 5)
    kept = torch.gather(x, 1, m.ids_keep[..., None].expand(-1, -1, 5))
    rest = torch.zeros(3, 64 - 32, 5)
    restored = torch.gather(torch.cat([kept, rest], 1), 1, m.ids_restore[..., None].expand(-1, -1, 5))
    visible = m.mask == 0
    assert torch.equal(restored[visible], x[visible])


def test_same_seed_same_mask_other_seed_other_mask():
    a = random_masking(2, 196, 0.75, generator=torch.Generator().manual_seed(7))
    b = random_masking(2, 196, 0.75, generator=torch.Generator().manual_seed(7))
    c = random_masking(2, 196, 0.75, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_the_open_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match="mask ratio"):
        num_visible(196, ratio)


def test_a_ratio_that_leaves_no_visible_patch_is_rejected():
    with pytest.raises(ValueError, match="no visible patch"):
        num_visible(16, 0.99)
