"""Epoch-seeded, resumable, rank-sharded sampling.

The order of epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``. Global batch ``g`` is
``perm[g·G:(g+1)·G]`` with ``G = batch·world``; rank ``r`` takes the ``r``-th slice of it. So the
same global batches are seen at any world size, and a run resumes mid-epoch by starting at ``g``.
An epoch holds whole optimizer steps only (``accum_iter`` global batches each): the leftover
batches are dropped, so no micro-batch of one step can spill into the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class ShardedEpochSampler(Sampler[int]):
    """Indices of one epoch for one rank, starting at global batch ``start_batch``."""

    def __init__(
        self, n: int, batch_size: int, seed: int, epoch: int,
        start_batch: int = 0, rank: int = 0, world_size: int = 1, accum_iter: int = 1,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start_batch, self.rank, self.world_size = start_batch, rank, world_size
        self.global_batch = batch_size * world_size
        # incomplete last batch and incomplete last optimizer step dropped
        self.num_batches = n // self.global_batch // accum_iter * accum_iter

    def __iter__(self) -> Iterator[int]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for g in range(self.start_batch, self.num_batches):
            lo = g * self.global_batch + self.rank * self.batch_size
            yield from perm[lo:lo + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0) * self.batch_size


def step_loaders(dataset, batch_size: int, seed: int, step: int, steps_per_epoch: int, total_steps: int, *,
                 accum_iter: int = 1, rank: int = 0, world_size: int = 1, **loader_kw) -> Iterator[Iterator]:
    """For each optimizer step from ``step`` to ``total_steps``, the iterator its ``accum_iter``
    micro-batches come from: one :class:`~torch.utils.data.DataLoader` per epoch over a
    :class:`ShardedEpochSampler` (``loader_kw`` go to the loader), after ``dataset.set_epoch``.

    The sampler yields whole optimizer steps only, so no micro-batch (and so no gradient) crosses
    a step or an epoch boundary, and a resume at any step sees exactly the batches it would have.
    Close the generator (or exhaust it) to stop the loader's workers.
    """
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler = ShardedEpochSampler(len(dataset), batch_size, seed, epoch, first * accum_iter, rank, world_size,
                                      accum_iter=accum_iter)
        loader = iter(DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_kw))
        try:
            for _ in range(first, min(steps_per_epoch, first + total_steps - step)):
                yield loader
                step += 1
        finally:  # stop the workers now, even when an error keeps this frame alive
            shutdown = getattr(loader, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
