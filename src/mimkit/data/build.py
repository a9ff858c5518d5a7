"""From a config to data: splits, statistics, a batch that fits, and the start-up summary.

* :func:`build_dataset` — one split of a named data set (folder, torchvision, shards, synthetic).
* :func:`dataset_from_config` — one split (``train`` | ``val`` | ``test``) of ``cfg.data``.
* :func:`pretrain_dataset` — the seeded pre-training set; it also resolves ``data.stats=compute``
  and fits the batch to the data (both written into ``cfg``, so the saved config, resume and
  evaluation use the same values).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mimkit.errors import DataError

from .datasets import (
    SPLITS,
    DataSplit,
    ImageFolderDataset,
    InMemoryDataset,
    SeededDataset,
    SyntheticDataset,
    Transform,
    dataset_stats,
    load_torchvision,
    reads_bytes,
    split_folder,
    split_indices,
)
from .decode import DeviceAugment, DeviceCrop, DeviceDataset, TensorCrop
from .shards import ShardDataset, has_split
from .sources import IN_PROCESS, TORCHVISION, canonical_name

log = logging.getLogger("mimkit")

STATS_SAMPLES = 1000  # images in the seeded sample behind data.stats=compute


class WithNoise:
    """Transform wrapper that also draws the masking noise, inside the per-sample seeded scope,
    so masks depend only on (seed, epoch, sample index) like the augmentation does."""

    def __init__(self, transform, num_patches: int) -> None:
        self.transform, self.num_patches = transform, num_patches
        self.reads_bytes = reads_bytes(transform)

    def __call__(self, img):
        return self.transform(img), torch.rand(self.num_patches)


def has_test_split(name: str, root: str | None) -> bool:
    """Whether the data set brings its own test split (folders and shards need a ``test/``)."""
    from pathlib import Path

    key = name.strip().lower().replace("-", "_")
    if key == "folder":
        return root is not None and Path(root).expanduser().is_dir() and \
            split_folder(Path(root).expanduser().absolute(), "test") is not None
    if key == "shards":
        return root is not None and has_split(root, "test")
    return key != "python"


def val_fraction(cfg) -> float:
    """``data.val_fraction``; when unset (None): 0 if the data set has its own test split, else 0.1."""
    if cfg.data.val_fraction is not None:
        return float(cfg.data.val_fraction)
    return 0.0 if has_test_split(cfg.data.name, cfg.data.root) else 0.1


def _base_dataset(key: str, root: str | None, source: str, transform: Transform, *, img_size: int,
                  in_chans: int, seed: int, synthetic_size: int) -> Dataset | None:
    """The source split ``source`` ("train"/"test") of data set ``key``; None if it has none."""
    if key in TORCHVISION:
        return load_torchvision(key, root, source, transform)
    if key == "python":
        if root not in IN_PROCESS:
            raise DataError(f"data.name=python: no data set named {root!r} was handed over in this process; "
                            "pass it again: mimkit.pretrain(..., dataset=ds) or mimkit.evaluate(..., dataset=ds)")
        return None if source == "test" else InMemoryDataset(IN_PROCESS[root], transform, in_chans)
    if key == "folder":
        if root is None:
            raise DataError("data.root: the 'folder' data set needs data.root=<folder of images>")
        if source == "test" and split_folder(Path(root).expanduser().absolute(), "test") is None:
            return None
        return ImageFolderDataset(root, source, transform, in_chans=in_chans)
    if key == "shards":
        if root is None:
            raise DataError("data.root: the 'shards' data set needs data.root=<folder written by mimkit make-shards>")
        if source == "test" and not has_split(root, "test"):
            return None
        return ShardDataset(root, source, transform, in_chans=in_chans)
    return SyntheticDataset(synthetic_size, img_size, in_chans, seed, source, transform)


_warned_no_test: set[str] = set()


def build_dataset(
    name: str,
    root: str | None,
    split: str,
    transform: Transform = None,
    *,
    on_corrupt: str = "error",
    val_fraction: float = 0.0,
    split_seed: int = 0,
    synthetic_size: int = 512,
    img_size: int = 32,
    in_chans: int = 3,
    seed: int = 0,
) -> DataSplit:
    """Split ``split`` ("train" | "val" | "test") of one of ``DATASET_NAMES``.

    ``train``/``val`` partition the source's training images (:func:`split_indices` with
    ``val_fraction`` and ``split_seed``); ``test`` is the source's test split. A source with
    no test split (a folder without ``test/``, shards without ``test/``) evaluates on ``val``
    instead, with a warning. ``on_corrupt`` applies to folders and shards; ``synthetic_size``,
    ``img_size`` and ``seed`` to "synthetic"; ``in_chans`` to folders, shards and "synthetic"
    (the torchvision data sets keep their native channels).
    """
    key = canonical_name(name)
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    kw = dict(img_size=img_size, in_chans=in_chans, seed=seed, synthetic_size=synthetic_size)
    if split == "test":
        base = _base_dataset(key, root, "test", transform, **kw)
        if base is not None:
            return DataSplit(base, on_corrupt=on_corrupt, split="test")
        if val_fraction <= 0:
            raise DataError(f"data.root: {root} has no test split and data.val_fraction is 0, so nothing is "
                            "held out for evaluation; add a test/ folder beside train/, or set data.val_fraction=0.1")
        if str(root) not in _warned_no_test:
            _warned_no_test.add(str(root))
            log.warning("%s has no test split; evaluating on the held-out val split (data.val_fraction=%g)",
                           root, val_fraction)
        split = "val"
    base = _base_dataset(key, root, "train", transform, **kw)
    train, val = split_indices(len(base), val_fraction, split_seed)
    if split == "val" and not val:
        raise DataError(f"the val split of {name} is empty (data.val_fraction={val_fraction}); "
                        "set data.val_fraction > 0")
    return DataSplit(base, train if split == "train" else val, on_corrupt=on_corrupt, split=split)


def stats_for(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization of a run: ``data.mean``/``data.std`` if set (``data.stats=compute`` stores
    them there), ImageNet's for ``data.stats=imagenet``, else the data set's usual one."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    name = "folder" if getattr(cfg.data, "stats", "dataset") == "imagenet" else cfg.data.name
    return dataset_stats(name, cfg.model.in_chans)


def dataset_from_config(cfg, split: str, transform=None) -> DataSplit:
    """``split`` ("train" | "val" | "test") of ``cfg.data`` with ``transform``.

    ``train`` excludes the validation images (``data.val_fraction``, ``data.split_seed``), so
    pre-training and evaluation training never see them.
    """
    d = cfg.data
    return build_dataset(d.name, d.root, split, transform, on_corrupt=d.on_corrupt, val_fraction=val_fraction(cfg),
                         split_seed=d.split_seed, synthetic_size=d.synthetic_size, img_size=cfg.model.img_size,
                         in_chans=cfg.model.in_chans, seed=cfg.train.seed)


def num_patches_of(cfg) -> int:
    from mimkit.models.archs import ARCHS

    patch = cfg.model.patch_size or ARCHS[cfg.model.arch]["patch_size"]
    return (cfg.model.img_size // patch) ** 2


def compute_stats(cfg, samples: int = STATS_SAMPLES) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a seeded sample of the training split, at the model's size.

    The sample is ``randperm(n)[:samples]`` seeded with ``data.split_seed``; images are resized
    to ``model.img_size`` squared (bicubic) before pixels are pooled.
    """
    from torchvision import transforms as T

    from .transforms import BICUBIC, ConvertChannels

    size = cfg.model.img_size
    tf = T.Compose([ConvertChannels(cfg.model.in_chans), T.Resize((size, size), interpolation=BICUBIC),
                    T.ToTensor()])
    ds = dataset_from_config(cfg, "train", tf)
    g = torch.Generator().manual_seed(cfg.data.split_seed)
    picked = torch.randperm(len(ds), generator=g)[:samples].tolist()
    total = torch.zeros(cfg.model.in_chans, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for i in picked:
        x = ds[i][0].double().flatten(1)
        total += x.mean(1)
        total_sq += (x * x).mean(1)
    mean = total / len(picked)
    std = (total_sq / len(picked) - mean * mean).clamp_min(1e-12).sqrt()
    return [round(v, 4) for v in mean.tolist()], [round(max(v, 1e-3), 4) for v in std.tolist()]


def fit_batch(cfg, n: int, world_size: int = 1) -> None:
    """Shrink ``train.accum_iter``, then ``train.batch_size``, so an epoch of ``n`` images has at
    least ``data.min_steps_per_epoch`` optimizer steps.

    Accumulation first (the per-device batch, hence memory and speed, stays), to the largest
    value that fits; then the batch, to the largest that fits (at least 1). The learning rate
    follows through ``train.blr`` x effective batch / 256. Runs that already fit are unchanged.
    """
    t, m = cfg.train, cfg.data.min_steps_per_epoch
    if m < 1 or n // (t.batch_size * world_size * t.accum_iter) >= m:
        return
    before = (t.batch_size, t.accum_iter)
    while t.accum_iter > 1 and n // (t.batch_size * world_size * t.accum_iter) < m:
        t.accum_iter -= 1
    if n // (t.batch_size * world_size) < m:
        t.batch_size = max(1, n // (world_size * m))
    if n // (t.batch_size * world_size * t.accum_iter) < 1:
        raise DataError(f"the training split has {n} images, fewer than the {world_size} processes; "
                        "add images or run fewer processes")
    log.warning("%d training images: batch %d x accum %d -> batch %d x accum %d per process, so an epoch has "
                "%d optimizer steps (data.min_steps_per_epoch=%d)", n, *before, t.batch_size, t.accum_iter,
                n // (t.batch_size * world_size * t.accum_iter), m)


def pretrain_augmentation(cfg):
    """The per-sample pre-training transform of ``data.decode`` (:mod:`mimkit.data.decode`)."""
    from .transforms import pretrain_transform

    d, size, chans = cfg.data, cfg.model.img_size, cfg.model.in_chans
    mean, std = stats_for(cfg)
    if d.decode == "torchvision":
        return TensorCrop(size, mean, std, chans, scale=d.crop_scale, hflip=d.hflip)
    if d.decode == "device":
        return DeviceCrop(chans)
    return pretrain_transform(size, mean, std, chans, scale=tuple(d.crop_scale), hflip=d.hflip)


def device_augmentation(cfg) -> DeviceAugment | None:
    """What finishes a batch on the training device: :class:`DeviceAugment` for
    ``data.decode=device``, else None (the workers deliver finished images and their noise)."""
    if cfg.data.decode != "device":
        return None
    mean, std = stats_for(cfg)
    return DeviceAugment(cfg.model.img_size, mean, std, cfg.model.in_chans, num_patches=num_patches_of(cfg),
                         seed=cfg.train.seed, scale=cfg.data.crop_scale, hflip=cfg.data.hflip)


def pretrain_dataset(cfg, world_size: int = 1, num_patches: int | None = None) -> SeededDataset:
    """The seeded pre-training set (``(image, noise), label`` per sample) of ``cfg``'s train split.

    Fills ``data.mean``/``data.std`` for ``data.stats=compute`` and fits the batch
    (:func:`fit_batch`), both in ``cfg``: call it before the config is saved.
    """
    d = cfg.data
    if val_fraction(cfg) == 0 and not has_test_split(d.name, d.root):
        # Fail now rather than after training: reconstruction grids and evaluation need held-out images.
        raise DataError(f"data.root: {d.root} has no test split and data.val_fraction is 0, so no image is held "
                        "out for reconstructions and evaluation; set data.val_fraction=0.1 or add a test/ folder")
    if d.stats == "compute" and (d.mean is None or d.std is None):
        t0 = time.perf_counter()
        d.mean, d.std = compute_stats(cfg)
        log.info("data.stats=compute: mean %s, std %s (seeded sample of up to %d training images, %.1f s; "
                 "saved in the run's config)", d.mean, d.std, STATS_SAMPLES, time.perf_counter() - t0)
    transform = pretrain_augmentation(cfg)
    if d.decode == "device":  # crops, flips and masks are drawn per batch (DeviceAugment)
        base = dataset_from_config(cfg, "train", transform)
        fit_batch(cfg, len(base), world_size)
        return DeviceDataset(base, cfg.train.seed)
    base = dataset_from_config(cfg, "train", WithNoise(transform, num_patches or num_patches_of(cfg)))
    fit_batch(cfg, len(base), world_size)
    return SeededDataset(base, cfg.train.seed)


# --------------------------------------------------------------------------------------------
# Start-up summary
# --------------------------------------------------------------------------------------------
