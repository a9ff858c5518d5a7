"""Masks as data: noise in, index tensors out (docs/methods/mae.md, emae.md, mixedae.md).

Every function here is pure: the same ``noise`` gives the same masks, which is what makes
training reproducible, resume exact, and the variants (EMAE parts, MixedAE mixing) cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Masks:
    """One masking of a batch. ``mask`` is float, 1 = masked (removed), 0 = visible."""

    ids_keep: torch.Tensor  # (B, len_keep) indices of visible patches, in shuffle order
    ids_restore: torch.Tensor  # (B, L) inverse of the shuffle
    mask: torch.Tensor  # (B, L) in original patch order


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """``len_keep = int(L * (1 - mask_ratio))`` — truncation, as the official MAE code."""
    return int(num_patches * (1 - mask_ratio))


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Masks:
    """MAE per-sample masking: small noise is kept (``argsort`` ascending)."""
    batch, length = noise.shape
    len_keep = num_visible(length, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, length, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masks(ids_keep, ids_restore, mask)


def second_draw(noise: torch.Tensor) -> torch.Tensor:
    """A second uniform draw from the same noise: each value's 24 random bits rotated by 12.

    ``torch.rand`` gives float32 values ``k / 2**24`` (24 random bits). Masking ranks patches
    by ``k``, i.e. mostly by its high 12 bits; this key ranks them by the low 12 bits first
    (then the high ones, so there are no new ties). The low bits are independent of the high
    ones, so the key is (up to ties in the high bits) an independent uniform draw, and still a
    pure function of the noise: exact resume holds without drawing more noise per sample.
    Float32 arithmetic here is exact (products and sums of multiples of ``2**-24`` below 1).
    """
    scaled = noise * 4096.0
    high = torch.floor(scaled)
    return (scaled - high) + high / 2**24


def predicted_subset(noise: torch.Tensor, masks: Masks, predict_ratio: float) -> torch.Tensor:
    """Indices (B, n_pred) of the masked patches that partial reconstruction predicts.

    The ``predict_ratio`` share of each image's masked patches with the smallest
    :func:`second_draw` key, in ascending patch order (PR-MIM-style partial reconstruction:
    a random subset of the masked patches, drawn independently of which patches are masked).
    """
    if not 0.0 < predict_ratio <= 1.0:
        raise ValueError(f"decoder.predict_ratio: must be in (0, 1], got {predict_ratio}")
    length = noise.shape[1]
    len_keep = masks.ids_keep.shape[1]
    n_pred = max(1, int((length - len_keep) * predict_ratio))
    # Visible patches get a key above every masked one (keys are < 1), so they sort last.
    key = second_draw(noise) + (1.0 - masks.mask) * 2.0
    ids = torch.argsort(key, dim=1)[:, :n_pred]
    return torch.sort(ids, dim=1).values


def num_parts_for(mask_ratio: float, num_patches: int) -> int:
    """``K = 1 / (1 - mask_ratio)`` for a K-part partition; errors when K is not usable."""
    visible = 1.0 - mask_ratio
    if visible <= 0:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible patch")
    parts = round(1.0 / visible)
    if abs(parts * visible - 1.0) > 1e-6:
        raise ValueError(
            f"mask_ratio={mask_ratio} gives K = 1/(1-mask_ratio) = {1.0 / visible:.4g}, not an "
            "integer; a K-part partition needs e.g. 0.5 (K=2), 0.75 (K=4), 0.8 (K=5), 0.875 (K=8)"
        )
    if num_patches % parts:
        raise ValueError(
            f"K={parts} parts (mask_ratio={mask_ratio}) do not divide L={num_patches} patches; "
            "choose an image/patch size whose patch count is a multiple of K"
        )
    return parts


def partition_masking(noise: torch.Tensor, num_parts: int) -> list[Masks]:
    """K disjoint visible sets covering every patch once (EMAE parts, MixedAE sources).

    One permutation ``π = argsort(noise)`` per image; part k keeps ``π[k·n_v:(k+1)·n_v]``.
    Part 0 is exactly ``random_masking(noise, 1 - 1/K)``: with one part, EMAE is MAE.
    """
    batch, length = noise.shape
    if length % num_parts:
        raise ValueError(f"{num_parts} parts do not divide L={length} patches")
    n_vis = length // num_parts
    ids_shuffle = torch.argsort(noise, dim=1)
    parts = []
    for k in range(num_parts):
        # Rotating the permutation puts part k's patches first; the rest are "masked".
        shuffle_k = torch.roll(ids_shuffle, shifts=-k * n_vis, dims=1)
        ids_restore = torch.argsort(shuffle_k, dim=1)
        mask = torch.ones(batch, length, device=noise.device)
        mask[:, :n_vis] = 0
        mask = torch.gather(mask, 1, ids_restore)
        parts.append(Masks(shuffle_k[:, :n_vis], ids_restore, mask))
    return parts


def stack_masks(parts: list[Masks]) -> Masks:
    """Concatenate parts on the batch axis, part-major (``K·B``)."""
    return Masks(
        torch.cat([p.ids_keep for p in parts]),
        torch.cat([p.ids_restore for p in parts]),
        torch.cat([p.mask for p in parts]),
    )


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x[b, ids[b, n]]`` for (B, L, D) tokens and (B, N) indices."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def mirror_masks(masks: Masks) -> Masks:
    """The masks that ``noise.flip(1)`` would have given: patch n ↔ patch L-1-n.

    RC-MAE's "different mask" option (docs/methods/rcmae.md) derives the teacher's mask from the student's
    noise this way, so it stays a pure function of the data-pipeline noise (exact resume) and
    works for any masks a base method produced (random, EMAE parts, MixedAE sources). On the
    patch grid it is the student's mask rotated by 180°.
    """
    length = masks.ids_restore.shape[1]
    return Masks(length - 1 - masks.ids_keep, masks.ids_restore.flip(1), masks.mask.flip(1))


def mixing_masks(noise: torch.Tensor, ways: int, num_parts: int) -> Masks:
    """Per-image masks of an r-way mixing plan (MixedAE, docs/methods/mixedae.md), stacked for the batch.

    The batch is read as ``B/r`` groups of ``r`` consecutive images (the sampler already
    shuffled it). Group g's partition comes from the noise of its first image; image slot s
    of the group keeps part s, so the r visible sets are disjoint and, when ``r = K``, cover
    the L positions exactly once. Image ``b = g·r + s`` gets row b of the result. With
    ``r = 1`` this is ``random_masking(noise, 1 - 1/K)``.
    """
    batch = noise.shape[0]
    if ways < 1 or ways > num_parts:
        raise ValueError(f"{ways}-way mixing needs 1 <= ways <= K={num_parts} disjoint parts")
    if batch % ways:
        raise ValueError(f"a batch of {batch} images cannot be split into groups of {ways}")
    parts = partition_masking(noise[::ways], num_parts)[:ways]

    def interleave(tensors: list[torch.Tensor]) -> torch.Tensor:
        # (G, ...) per slot → (G·r, ...) with row g·r + s = slot s of group g.
        return torch.stack(tensors, dim=1).flatten(0, 1)

    return Masks(
        interleave([p.ids_keep for p in parts]),
        interleave([p.ids_restore for p in parts]),
        interleave([p.mask for p in parts]),
    )
