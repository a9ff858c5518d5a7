"""Mask primitives the methods are built from: K-part partitions, mixing plans, mirrored masks."""

import pytest
import torch

from mimkit.masking import (
    mirror_masks,
    mixing_masks,
    num_parts_for,
    partition_masking,
    random_masking,
)


def test_partition_is_disjoint_and_complete():
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    parts = partition_masking(noise, 4)
    visible = torch.stack([1 - p.mask for p in parts])  # (K, B, L)
    assert torch.equal(visible.sum(0), torch.ones(5, 64))  # each patch visible in exactly one part
    for p in parts:
        assert p.ids_keep.shape == (5, 16)
        assert torch.equal(p.mask.gather(1, p.ids_keep), torch.zeros(5, 16))
        assert torch.equal(p.ids_restore.argsort(1)[:, :16], p.ids_keep)


def test_part_zero_is_random_masking():
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    part0, ref = partition_masking(noise, 4)[0], random_masking(noise, 0.75)
    assert torch.equal(part0.ids_keep, ref.ids_keep)
    assert torch.equal(part0.ids_restore, ref.ids_restore)
    assert torch.equal(part0.mask, ref.mask)


@pytest.mark.parametrize("ratio,length,match", [(0.7, 16, "not an integer"), (0.75, 18, "do not divide")])
def test_bad_num_parts_errors(ratio, length, match):
    with pytest.raises(ValueError, match=match):
        num_parts_for(ratio, length)


def test_mirror_masks_equal_masks_of_flipped_noise():
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(2))
    for masks, flipped in ((random_masking(noise, 0.75), random_masking(noise.flip(1), 0.75)),
                           (partition_masking(noise, 4)[2], partition_masking(noise.flip(1), 4)[2])):
        m = mirror_masks(masks)
        assert torch.equal(m.mask, flipped.mask)
        assert torch.equal(m.ids_restore, flipped.ids_restore)
        assert torch.equal(m.ids_keep.sort(1).values, flipped.ids_keep.sort(1).values)
    assert not torch.equal(mirror_masks(random_masking(noise, 0.75)).mask, random_masking(noise, 0.75).mask)


def test_mixing_masks_give_each_group_a_partition():
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(3))
    masks = mixing_masks(noise, ways=4, num_parts=4)
    visible = (1 - masks.mask).reshape(2, 4, 16)  # (groups, slots, L)
    assert torch.equal(visible.sum(1), torch.ones(2, 16))  # σ is a function: one source per position
    # Slot s of group g is part s of the partition drawn from the group's first image's noise.
    parts = partition_masking(noise[::4], 4)
    for g in range(2):
        for s in range(4):
            assert torch.equal(masks.ids_keep[g * 4 + s], parts[s].ids_keep[g])
    # One way is plain MAE masking.
    one = mixing_masks(noise, ways=1, num_parts=4)
    assert torch.equal(one.mask, random_masking(noise, 0.75).mask)


def test_mixing_masks_errors():
    noise = torch.rand(6, 16)
    with pytest.raises(ValueError, match="groups of 4"):
        mixing_masks(noise, ways=4, num_parts=4)
    with pytest.raises(ValueError, match="ways"):
        mixing_masks(torch.rand(8, 16), ways=8, num_parts=4)
