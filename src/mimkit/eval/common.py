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
                     max_samples: int = 0, seed: int | None = None, require_labels: bool = True) -> Dataset:
    """``split`` ("train" | "val" | "test") of cfg's data set with ``transform`` (default: the
    evaluation transform). ``train`` excludes the ``val`` images (``data.val_fraction``).

    ``label_fraction < 1`` keeps a seeded class-balanced subset (``data.label_fraction``);
    ``max_samples`` then caps the size with a seeded random subset. Raises a DataError if the
    data set has no labels (unless ``require_labels`` is False, e.g. for reconstruction
    grids), or if the label subset leaves a class without an image.
    """
    from mimkit.data import dataset_from_config, eval_transform, stats_for
    from mimkit.errors import DataError

    seed = cfg.train.seed if seed is None else seed
    if transform is None:
        mean, std = stats_for(cfg)
        transform = eval_transform(cfg.model.img_size, mean, std, cfg.model.in_chans)
    ds = dataset_from_config(cfg, split, transform)
    if require_labels and not getattr(ds, "num_classes", 0):
        raise DataError(f"data.root: {cfg.data.root or cfg.data.name} has no labels, which k-NN, linear probing "
                        "and fine-tuning need; put the images in one sub-folder per class")
    if label_fraction < 1.0:
        labels = dataset_labels(ds)
        ds = Subset(ds, class_balanced_indices(labels, label_fraction, seed))
        kept = np.bincount(labels[np.asarray(ds.indices, dtype=np.int64)], minlength=ds.dataset.num_classes)
        empty = [ds.dataset.classes[c] for c in np.flatnonzero(kept == 0)]
        if empty:
            raise DataError(f"data.label_fraction={label_fraction} leaves {len(empty)} class(es) with no {split} "
                            f"image ({', '.join(map(str, empty[:5]))}); add images of those classes or raise "
                            "data.label_fraction")
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


def token_parts(tokens: torch.Tensor, feature: str) -> list[torch.Tensor]:
    """(B, 1+L, D) tokens → the pooled parts of a feature: ``cls`` token, ``mean`` of the patch
    tokens, or ``both``."""
    if feature not in ("cls", "mean", "both"):
        raise ValueError(f"feature must be cls, mean or both, got {feature!r}")
    cls, mean = tokens[:, 0], tokens[:, 1:].mean(1)
    return {"cls": [cls], "mean": [mean], "both": [cls, mean]}[feature]


def pool_tokens(tokens: torch.Tensor, feature: str) -> torch.Tensor:
    """The feature (``cls`` | ``mean`` | ``both``, concatenated) of (B, 1+L, D) tokens."""
    return torch.cat(token_parts(tokens, feature), dim=-1)


def knn_features(parts: list[torch.Tensor]) -> torch.Tensor:
    """k-NN features: each part ℓ2-normalised (so cls and mean weigh the same), concatenated,
    and the whole normalised again (cosine similarity = dot product)."""
    import torch.nn.functional as F

    return F.normalize(torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1), dim=-1)


class InputPixels(torch.nn.Module):
    """The "encoder" whose features are the input pixels: its tokens are the flattened image, as a
    class token and as the one patch token, so ``cls``, ``mean`` and ``both`` all read the pixels.
    The yardstick a pre-trained encoder's k-NN and linear probe are read against (small images).
    Its ``feature_name`` replaces ``eval.feature`` in results: the pixels have no tokens to pool."""

    feature_name = "pixels"

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.flatten(1)
        return torch.stack([x, x], dim=1)


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
