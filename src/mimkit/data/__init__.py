"""Datasets and transforms for masked-image-modeling pre-training and evaluation."""

from .datasets import (
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    ArrayDataset,
    ImageFolderDataset,
    SeededDataset,
    SyntheticDataset,
    build_dataset,
    cache_dir,
    dataset_stats,
    find_idx_root,
    read_idx,
)
from .shards import IterableShardDataset, ShardDataset, write_shards
from .transforms import ConvertChannels, eval_transform, pretrain_transform

__all__ = [
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "ArrayDataset",
    "ConvertChannels",
    "ImageFolderDataset",
    "IterableShardDataset",
    "SeededDataset",
    "ShardDataset",
    "SyntheticDataset",
    "build_dataset",
    "cache_dir",
    "dataset_stats",
    "eval_transform",
    "find_idx_root",
    "pretrain_transform",
    "read_idx",
    "write_shards",
]


def stats_for(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalization of a run: ``data.mean``/``data.std`` if set, else the data set's usual one."""
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    return dataset_stats(cfg.data.name, cfg.model.in_chans)
