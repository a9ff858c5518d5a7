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
