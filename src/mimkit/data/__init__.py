"""Datasets and transforms for masked-image-modeling pre-training and evaluation."""

from .build import build_dataset, dataset_from_config, stats_for
from .datasets import (
    DATASET_NAMES,
    IMAGE_EXTENSIONS,
    SPLITS,
    CorruptImageError,
    DataSplit,
    ImageFolderDataset,
    SeededDataset,
    SyntheticDataset,
    dataset_stats,
    load_image,
    split_indices,
)
from .sources import cache_dir
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
