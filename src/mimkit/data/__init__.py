"""Datasets and transforms for masked-image-modeling pre-training and evaluation."""

from .datasets import (
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    SPLITS,
    CorruptImageError,
    DataSplit,
    ImageFolderDataset,
    SeededDataset,
    SyntheticDataset,
    build_dataset,
    cache_dir,
    dataset_stats,
    load_image,
    split_indices,
)
from .transforms import ConvertChannels, eval_transform, pretrain_transform

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "ConvertChannels",
    "CorruptImageError",
    "DataSplit",
    "ImageFolderDataset",
    "SeededDataset",
    "SyntheticDataset",
    "build_dataset",
    "cache_dir",
    "dataset_from_config",
    "dataset_stats",
    "eval_transform",
    "load_image",
    "pretrain_transform",
    "split_indices",
    "stats_for",
]


def stats_for(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization of a run: ``data.mean``/``data.std`` if set (``data.stats=compute`` stores
    them there), ImageNet's for ``data.stats=imagenet``, else the data set's usual one."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    name = "folder" if getattr(cfg.data, "stats", "dataset") == "imagenet" else cfg.data.name
    return dataset_stats(name, cfg.model.in_chans)


def dataset_from_config(cfg, split: str, transform=None):
    """``split`` ("train" | "val" | "test") of the run's data set, as configured in ``cfg.data``."""
    from .build import dataset_from_config as build

    return build(cfg, split, transform)
