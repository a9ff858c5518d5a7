import pytest
import torch

from mimkit.masking import num_parts_for, num_visible, partition_masking, random_masking, stack_masks
from mimkit.models.vit import patchify, unpatchify


def test_patchify_order_matches_official_convention():
    # (B, C, H, W) with a unique value per pixel: patch n = row-major grid cell, inside it
    # row, then column, then channel fastest.
    b, c, h, w, p = 1, 3, 4, 6, 2
    imgs = torch.arange(b * c * h * w, dtype=torch.float32).reshape(b, c, h, w)
    x = patchify(imgs, p)
    assert x.shape == (1, (h // p) * (w // p), p * p * c)
    for n in range(x.shape[1]):
        gi, gj = divmod(n, w // p)
        expected = [imgs[0, ch, gi * p + r, gj * p + q] for r in range(p) for q in range(p) for ch in range(c)]
        assert torch.equal(x[0, n], torch.stack(expected))


def test_unpatchify_is_exact_inverse():
    imgs = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(imgs, 4), 4, (2, 3), 3), imgs)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 10, 12), 4)


def test_random_masking_semantics():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]])
    m = random_masking(noise, 0.75)
    # small noise is kept; len_keep = int(8 * 0.25) = 2 -> patches 1 (0.1) and 5 (0.2)
    assert m.ids_keep.tolist() == [[1, 5]]
    assert m.mask.tolist() == [[1, 0, 1, 1, 1, 0, 1, 1]]  # 1 = masked, original order
    assert torch.equal(torch.argsort(m.ids_restore), torch.argsort(noise))  # restore inverts shuffle


def test_len_keep_truncates():
    assert num_visible(49, 0.75) == 12  # int(12.25)
    assert num_visible(10, 0.75) == 2  # int(2.5)
    noise = torch.rand(3, 49)
    m = random_masking(noise, 0.75)
    assert m.ids_keep.shape == (3, 12)
    assert (m.mask.sum(1) == 37).all()


def test_partition_is_disjoint_complete_and_part0_is_mae():
    noise = torch.rand(5, 64)
    parts = partition_masking(noise, 4)
    keep = torch.cat([p.ids_keep for p in parts], dim=1)
    assert torch.equal(keep.sort(1).values, torch.arange(64).expand(5, -1))
    assert torch.equal(sum(1 - p.mask for p in parts), torch.ones(5, 64))
    mae = random_masking(noise, 0.75)
    assert torch.equal(parts[0].ids_keep, mae.ids_keep) and torch.equal(parts[0].mask, mae.mask)
    assert torch.equal(parts[0].ids_restore, mae.ids_restore)
    stacked = stack_masks(parts)
    assert stacked.mask.shape == (20, 64) and torch.equal(stacked.mask[5:10], parts[1].mask)


def test_num_parts_errors():
    assert num_parts_for(0.75, 64) == 4
    with pytest.raises(ValueError, match="not an integer"):
        num_parts_for(0.7, 64)
    with pytest.raises(ValueError, match="do not divide"):
        num_parts_for(0.75, 49)
