"""Where the data sets live: their names, the torchvision classes behind them, the cache folder."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from mimkit.errors import DataError

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "folder", "shards", "synthetic", "python")

# data.name=python: data sets handed over in Python (``mimkit.pretrain(..., dataset=ds)``), by the
# name in data.root. They live only in this process, so a resume or an evaluation hands them again.
IN_PROCESS: dict[str, Any] = {}


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in DATASET_NAMES:
        close = difflib.get_close_matches(key, DATASET_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"data.name: unknown data set {name!r}; valid names are {', '.join(DATASET_NAMES)}.{hint}")
    return key


def check_in_chans(in_chans: int) -> int:
    """1 (grayscale) or 3 (RGB): the channel counts every mimkit data set and model take."""
    if in_chans not in (1, 3):
        raise DataError(f"in_chans must be 1 or 3, got {in_chans}")
    return in_chans


def cache_dir() -> Path:
    """Data cache and default ``data.root``: ``$MIMKIT_CACHE`` or ``~/.cache/mimkit``."""
    return Path(os.environ.get("MIMKIT_CACHE") or Path.home() / ".cache" / "mimkit").expanduser()


TORCHVISION = {  # name -> (torchvision class, channels)
    "fashion_mnist": ("FashionMNIST", 1),
    "mnist": ("MNIST", 1),
    "cifar10": ("CIFAR10", 3),
    "cifar100": ("CIFAR100", 3),
}


def data_root(name: str, root: str | os.PathLike | None) -> Path:
    """Where torchvision looks for ``name``: ``root`` or :func:`cache_dir` (the fetch default)."""
    return Path(root).expanduser().absolute() if root else cache_dir()


