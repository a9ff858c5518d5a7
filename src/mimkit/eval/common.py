"""Shared evaluation pieces: labelled splits, seeded class-balanced label subsets, pooling."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Integer labels of every sample, read without decoding images where the data set allows."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if hasattr(ds, "labels"):
        return np.asarray(ds.labels, dtype=np.int64)
    if hasattr(ds, "samples"):
        return np.asarray([label for _, label in ds.samples], dtype=np.int64)
    if type(ds).__name__ == "SyntheticDataset":  # label i % num_classes by construction
        return np.arange(len(ds), dtype=np.int64) % ds.num_classes
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def class_balanced_indices(labels: np.ndarray | torch.Tensor, fraction: float, seed: int = 0) -> list[int]:
    """A seeded subset with the same number of samples from every class.

    Each class contributes ``max(1, round(fraction · N / C))`` samples (all of a class when it
    has fewer), drawn without replacement by a generator seeded with ``seed``; ``fraction=1``
    returns every index. Sorted, so the subset does not depend on class order.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return list(range(len(labels)))
    classes = np.unique(labels[labels >= 0])
    per_class = max(1, round(fraction * len(labels) / max(len(classes), 1)))
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        picked.append(rng.choice(members, size=min(per_class, len(members)), replace=False))
    return sorted(int(i) for i in np.concatenate(picked)) if picked else []


def labelled_dataset(cfg, split: str, transform: Callable | None = None, label_fraction: float = 1.0,
                     max_samples: int = 0, seed: int | None = None) -> Dataset:
    """``split`` of cfg's data set with ``transform`` (default: the evaluation transform).

    ``label_fraction < 1`` keeps a seeded class-balanced subset (``data.label_fraction``);
    ``max_samples`` then caps the size with a seeded random subset.
    """
    from mimkit.data import build_dataset, eval_transform, stats_for

    seed = cfg.train.seed if seed is None else seed
    if transform is None:
        mean, std = stats_for(cfg)
        transform = eval_transform(cfg.model.img_size, mean, std, cfg.model.in_chans)
    ds = build_dataset(cfg.data.name, cfg.data.root, split, transform, on_corrupt=cfg.data.on_corrupt,
                       synthetic_size=cfg.data.synthetic_size, img_size=cfg.model.img_size,
                       in_chans=cfg.model.in_chans, seed=cfg.train.seed)
    if label_fraction < 1.0:
        ds = Subset(ds, class_balanced_indices(dataset_labels(ds), label_fraction, seed))
    if max_samples and max_samples < len(ds):
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:max_samples].tolist()))
    return ds


def num_classes_of(ds: Dataset) -> int:
    """Number of classes of a (possibly wrapped) data set."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    n = getattr(ds, "num_classes", 0)
    return int(n) if n else int(dataset_labels(ds).max()) + 1


def pool_tokens(tokens: torch.Tensor, feature: str) -> torch.Tensor:
    """(B, 1+L, D) tokens → features: ``cls`` token, ``mean`` of patch tokens, or ``both``."""
    if feature == "cls":
        return tokens[:, 0]
    if feature == "mean":
        return tokens[:, 1:].mean(1)
    if feature == "both":
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
    raise ValueError(f"feature must be cls, mean or both, got {feature!r}")


def autocast_context(cfg, device: torch.device):
    """The run's autocast (``train.amp``: bf16 on a GPU by default, none on a CPU)."""
    from mimkit.engine.precision import autocast_for

    return autocast_for(cfg.train.amp, device)


def timm_encoder(cfg, weights=None, **kwargs) -> torch.nn.Module:
    """A timm ``VisionTransformer`` of cfg's image size from ``weights`` (a
    :class:`~mimkit.interop.convert.Weights`) or, with None, from a fresh MAE initialisation of
    cfg's architecture (sin-cos positions, xavier) seeded by ``train.seed``: the from-scratch
    baseline starts exactly where pre-training would."""
    from mimkit.interop.timm import to_timm_vit

    if weights is None:
        from mimkit.models import model_from_config

        torch.manual_seed(cfg.train.seed)
        mae = model_from_config(cfg)
        return to_timm_vit(mae.state_dict(), mae.arch, img_size=cfg.model.img_size, **kwargs)
    return to_timm_vit(weights.state, weights.arch, img_size=cfg.model.img_size, **kwargs)
