"""Datasets for mimkit: torchvision's (Fashion-)MNIST and CIFAR, image folders, shards, synthetic.

Every dataset returns ``(image, label)``: ``image`` is whatever ``transform`` returns (a PIL
image when ``transform`` is None) and ``label`` is an ``int`` (-1 for unlabeled data). Every
dataset exposes ``num_classes`` (0 if unlabeled), ``in_chans`` (channels it delivers) and
``labels`` (one int per sample, read without decoding images).

Splits (:func:`build_dataset`): ``train`` and ``val`` are carved from the source's training
images by :func:`split_indices` (``val_fraction``, ``split_seed``); ``test`` is the source's own
test split. Library calls never download anything: ``mimkit data fetch NAME`` does
(:mod:`mimkit.data.fetch`).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from mimkit.errors import DataError

from .fetch import fetch_command, is_present, unpack_local
from .sources import DATASET_NAMES, TORCHVISION, cache_dir, canonical_name, check_in_chans, data_root  # noqa: F401

logger = logging.getLogger("mimkit")

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "folder": (IMAGENET_MEAN, IMAGENET_STD),
    "shards": (IMAGENET_MEAN, IMAGENET_STD),
    "synthetic": (IMAGENET_MEAN, IMAGENET_STD),
    "python": (IMAGENET_MEAN, IMAGENET_STD),  # data.stats=compute measures your data instead
}

Transform = Callable[[Image.Image], Any] | None


class CorruptImageError(DataError):
    """One image that cannot be decoded; :class:`DataSplit` skips it under ``on_corrupt=skip``.

    ``what`` names the image and the reason, without the fix the full message adds.
    """

    def __init__(self, what: str, fix: str = "remove it, or set data.on_corrupt=skip") -> None:
        if "\nOriginal Traceback" in what:  # re-raised from a DataLoader worker: keep its one line
            message = what.strip().splitlines()[-1].split(": ", 1)[-1]
            super().__init__(message)
            self.what = message.split("; ")[0]
            return
        super().__init__(f"{what}; {fix}")
        self.what = what


# --------------------------------------------------------------------------------------------
# Helpers shared by all datasets
# --------------------------------------------------------------------------------------------


def _check_split(split: str) -> str:
    """A source split: ``train`` or ``test`` (``val`` is carved from ``train`` by build_dataset)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _match_channels(values: Sequence[float], in_chans: int) -> tuple[float, ...]:
    """Adapt per-channel statistics to ``in_chans`` (repeat a gray value, or average RGB)."""
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"Cannot adapt {len(values)}-channel statistics to {in_chans} channels")


def dataset_stats(
    name: str, in_chans: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalization ``(mean, std)`` for ``name`` (ImageNet's for folders and shards).

    Native channel count by default; pass ``in_chans`` to get statistics matching a channel
    conversion (gray repeated to RGB, or RGB averaged to gray).
    """
    mean, std = _STATS[canonical_name(name)]
    if in_chans is not None:
        mean, std = _match_channels(mean, in_chans), _match_channels(std, in_chans)
    return mean, std


def dataset_labels_of(ds: Dataset) -> np.ndarray:
    """Labels of a base data set without decoding images (``labels``, ``targets`` or ``samples``)."""
    for attr in ("labels", "targets"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


# --------------------------------------------------------------------------------------------
# torchvision data sets: Fashion-MNIST, MNIST, CIFAR-10/100 (files from `mimkit data fetch`)
# --------------------------------------------------------------------------------------------

def load_torchvision(name: str, root: str | None, split: str, transform: Transform) -> Dataset:
    import torchvision.datasets as tvd

    cls_name, in_chans = TORCHVISION[name]
    folder = data_root(name, root)
    if not is_present(name, folder):
        # A local gzip copy needs no network: in data.root, or (default root) the cache or Debian's folder.
        unpack_local(name, folder, elsewhere=root is None)
    if not is_present(name, folder):
        raise DataError(
            f"{name} is not in {folder} (data.root); get it with `{fetch_command(name, root)}`"
        )
    try:
        ds = getattr(tvd, cls_name)(str(folder), train=split == "train", transform=transform, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name} in {folder} is incomplete or corrupt ({e}); "
                        f"fetch it again with `{fetch_command(name, root)}`") from None
    ds.num_classes, ds.in_chans = len(ds.classes), in_chans
    ds.labels = np.asarray(ds.targets, dtype=np.int64)
    return ds


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) under ``folder``, recursively, in path order (hidden files ignored)."""
    images, other = [], []
    for p in sorted(folder.rglob("*"), key=lambda p: p.as_posix()):
        if p.is_file() and not p.name.startswith("."):
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else other).append(p)
    return images, other


def split_folder(root: Path, split: str) -> Path | None:
    """The folder holding source ``split``: ``root/train`` and ``root/test`` (or ImageNet's
    ``root/val``) when ``root/train`` exists, else ``root`` itself for ``train`` and None (no
    test split) for ``test``."""
    if not (root / "train").is_dir():
        return root if split == "train" else None
    if split == "train":
        return root / "train"
    return next((root / n for n in ("test", "val") if (root / n).is_dir()), None)


@dataclass(frozen=True)
class EncodedFile:
    """An image file's bytes, not decoded, and the name errors give it. The data sets hand one to
    a transform that sets ``reads_bytes = True`` (``data.decode`` other than pil,
    :mod:`mimkit.data.decode`) instead of a PIL image."""

    data: bytes
    where: str


def reads_bytes(transform: Transform) -> bool:
    """Whether ``transform`` takes an :class:`EncodedFile` rather than a PIL image."""
    return bool(getattr(transform, "reads_bytes", False))


def load_image(source: str | os.PathLike | IO[bytes], mode: str, where: str | None = None) -> Image.Image:
    """Decode an image (file or stream) fully into ``mode`` ("L" or "RGB").

    A :class:`CorruptImageError` names ``where`` (default: the path) and the fix.
    """
    try:
        with Image.open(source) as img:
            return img.convert(mode)  # convert forces decoding, so truncation shows here
    except Exception as e:  # PIL raises many types on corrupt files
        raise CorruptImageError(f"cannot read image {where or source} ({type(e).__name__}: {e})") from None


class ImageFolderDataset(Dataset):
    """Recursive image folder; labeled by top-level sub-folder when every image is in one.

    ``root/train`` + ``root/test`` (or ``root/val``, ImageNet's layout) are the source splits;
    otherwise the whole folder is the training split. Images are converted to RGB
    (``in_chans=3``) or gray (``in_chans=1``). An undecodable image raises
    :class:`CorruptImageError` (:class:`DataSplit` skips it under ``on_corrupt=skip``).
    ``skipped_files`` lists the files that are not images.
    """

    def __init__(
        self, root: str | os.PathLike, split: str = "train", transform: Transform = None, *, in_chans: int = 3
    ) -> None:
        check_in_chans(in_chans)
        root = Path(root).expanduser().absolute()  # error messages show full paths
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            raise DataError(f"data.root: {root} {what}; expected a folder of images "
                            f"({', '.join(IMAGE_EXTENSIONS)}), optionally in one sub-folder per class")
        folder = split_folder(root, _check_split(split))
        if folder is None:
            raise DataError(f"{root} has no test split (no test/ or val/ folder beside train/)")
        self.root = folder
        self.transform, self.in_chans = transform, in_chans
        self._mode = "L" if in_chans == 1 else "RGB"

        loose = _scan_top(folder)[0]
        subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        per_class = [(d.name, _scan(d)[0]) for d in subdirs]
        per_class = [(c, files) for c, files in per_class if files]
        images, self.skipped_files = _scan(folder)
        if per_class and not loose:  # every image is in a class folder: labeled
            self.classes = [c for c, _ in per_class]
            self.samples = [(p, label) for label, (_, fs) in enumerate(per_class) for p in fs]
        else:  # loose images (with or without sub-folders): all images, unlabeled
            if per_class:
                logger.info("%s has images outside sub-folders: using all %d images, unlabeled", folder, len(images))
            self.classes = []
            self.samples = [(p, -1) for p in images]
        self.num_classes = len(self.classes)
        self.labels = np.asarray([label for _, label in self.samples], dtype=np.int64)
        if not self.samples:
            raise DataError(f"data.root: no images in {folder}; expected files ending in "
                            f"{', '.join(IMAGE_EXTENSIONS)} (any case), optionally in class sub-folders")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        if reads_bytes(self.transform):
            try:
                data = path.read_bytes()
            except OSError as e:
                raise CorruptImageError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
            return self.transform(EncodedFile(data, str(path))), label
        img = load_image(path, self._mode)
        return (self.transform(img) if self.transform is not None else img), label


def _scan_top(folder: Path) -> tuple[list[Path], list[Path]]:
    """Images and other files directly in ``folder`` (not in sub-folders)."""
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.as_posix())
    return [p for p in files if _is_image(p)], [p for p in files if not _is_image(p)]


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


class InMemoryDataset(Dataset):
    """A map-style data set handed over in Python: each item is an image (PIL, a CHW tensor, an HWC
    array) or ``(image, label)``. Images become PIL in ``in_chans`` channels, then ``transform``."""

    def __init__(self, data: Dataset, transform: Transform = None, in_chans: int = 3) -> None:
        self.data, self.transform, self.in_chans = data, transform, in_chans
        self._labels: np.ndarray | None = None

    @property
    def labels(self) -> np.ndarray:
        """One label per item (-1 where an item is a bare image), read once."""
        if self._labels is None:
            items = (self.data[i] for i in range(len(self.data)))
            self._labels = np.asarray([int(it[1]) if isinstance(it, tuple | list) else -1 for it in items],
                                      dtype=np.int64)
        return self._labels

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.min() >= 0 else 0

    @property
    def classes(self) -> list[int]:
        return list(range(self.num_classes))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        item = self.data[index]
        img, label = (item[0], int(item[1])) if isinstance(item, tuple | list) else (item, -1)
        if isinstance(img, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            img = to_pil_image(img)
        elif isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        if not isinstance(img, Image.Image):
            raise DataError(f"item {index} of the data set given in Python is a {type(img).__name__}; "
                            "give PIL images, CHW tensors or HWC arrays (or (image, label) pairs)")
        img = img.convert("L" if self.in_chans == 1 else "RGB")
        return (self.transform(img) if self.transform is not None else img), label


class SyntheticDataset(Dataset):
    """Deterministic, learnable synthetic images in 10 classes.

    Sample ``i`` (label ``i % 10``) is generated from
    ``torch.Generator().manual_seed(seed * 1_000_003 + i)``, plus ``2**31`` for the test split
    (the CPU generator only uses the low 32 bits of its seed), so any index is reproducible on
    its own. Class ``c`` has a bright blob at angle ``2*pi*c/10`` on a circle, stripes oriented
    at ``pi*c/10`` and, for RGB, a class tint; jitter, stripe phase and noise vary per sample.
    """

    TEST_OFFSET = 1 << 31

    def __init__(
        self,
        size: int = 512,
        img_size: int = 32,
        in_chans: int = 3,
        seed: int = 0,
        split: str = "train",
        transform: Transform = None,
        num_classes: int = 10,
    ) -> None:
        check_in_chans(in_chans)
        self.size, self.img_size, self.in_chans, self.seed = size, img_size, in_chans, seed
        self.num_classes, self.transform = num_classes, transform
        self.classes = [f"class_{c}" for c in range(num_classes)]
        self.labels = np.arange(size, dtype=np.int64) % num_classes
        self._offset = self.TEST_OFFSET if _check_split(split) == "test" else 0
        coords = torch.linspace(-1.0, 1.0, img_size)
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def render(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample ``index`` as a float tensor (C, H, W) in [0, 1] plus its label."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + self._offset)
        label = index % self.num_classes
        u = torch.rand(6, generator=g)
        frac = label / self.num_classes
        angle = math.pi * frac + 0.15 * (u[0] - 0.5)
        freq = 2.5 + u[1]  # cycles across the image
        proj = self._xx * torch.cos(angle) + self._yy * torch.sin(angle)
        stripes = torch.sin(math.pi * freq * proj + 2 * math.pi * u[2])
        cx = 0.5 * math.cos(2 * math.pi * frac) + 0.2 * (u[3] - 0.5)
        cy = 0.5 * math.sin(2 * math.pi * frac) + 0.2 * (u[4] - 0.5)
        blob = torch.exp(-((self._xx - cx) ** 2 + (self._yy - cy) ** 2) / (2 * 0.25**2))
        if self.in_chans == 3:
            tint = 0.6 + 0.4 * torch.cos(2 * math.pi * (frac + torch.arange(3) / 3))
        else:
            tint = torch.ones(1)
        noise = torch.randn(self.in_chans, self.img_size, self.img_size, generator=g)
        img = 0.25 + 0.1 * u[5] + 0.15 * stripes + 0.5 * blob * tint[:, None, None] + 0.06 * noise
        return img.clamp(0.0, 1.0), label

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        img, label = self.render(index)
        array = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if self.in_chans == 1 else array)
        return (self.transform(pil) if self.transform is not None else pil), label


# --------------------------------------------------------------------------------------------
# Splits, corrupt images, entry point
# --------------------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train, val)`` indices of a source training split of ``n`` images.

    ``perm = randperm(n)`` seeded with ``seed`` (``data.split_seed``); the first
    ``round(n * val_fraction)`` entries are the validation split, the rest the training split;
    both sorted. Other modules rely on this exact rule (see ``tests/data/test_splits.py``).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = round(n * val_fraction)
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


class DataSplit(Dataset):
    """The samples ``indices`` of a base data set (all by default), with corrupt images handled.

    With ``on_corrupt="skip"`` an undecodable sample is replaced by the next readable one of
    the split (cyclically), so the replacement is the same in every process and on resume;
    with ``"error"`` the :class:`CorruptImageError` propagates. ``labels``, ``num_classes``,
    ``classes`` and ``in_chans`` describe the split.
    """

    _FORWARDED = ("num_classes", "classes", "in_chans", "root", "skipped_files", "transform", "shards")

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None, *, on_corrupt: str = "error",
                 split: str = "train") -> None:
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"data.on_corrupt: must be 'error' or 'skip', got {on_corrupt!r}")
        self.base, self.on_corrupt, self.split = base, on_corrupt, split
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self._bad: set[int] = set()

    @property
    def labels(self) -> np.ndarray:
        return dataset_labels_of(self.base)[np.asarray(self.indices, dtype=np.int64)]

    def __getattr__(self, name: str) -> Any:
        if name in DataSplit._FORWARDED and "base" in self.__dict__:
            return getattr(self.base, name)
        raise AttributeError(name)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.indices)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                return self.base[self.indices[j]]
            except CorruptImageError as e:
                if self.on_corrupt == "error":
                    raise
                logger.warning("data.on_corrupt=skip: skipping %s", e.what)
                self._bad.add(j)
        raise DataError(f"all {n} images of the {self.split} split are unreadable")


class SeededDataset(Dataset):
    """Wraps a dataset so sample i's random augmentation depends only on (seed, epoch, i).

    Seeds torch (CPU), ``random`` and numpy for the duration of each ``__getitem__`` and
    restores the previous RNG states afterwards, so results do not depend on the number of
    workers or processes. In a DataLoader worker nothing else reads those generators, so they are
    seeded and not restored there (saving and restoring numpy's state alone costs ~0.2 ms a sample,
    as much as decoding and augmenting a 28 px image). Call ``set_epoch`` before each epoch; with
    DataLoader ``persistent_workers=True`` the workers keep their own copy, so recreate the loader
    instead.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` reproduces."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def sample_seed(self, index: int) -> int:
        """64-bit seed for sample ``index`` at the current epoch."""
        seq = np.random.SeedSequence([self.seed, self.epoch, index])
        return int(seq.generate_state(1, dtype=np.uint64)[0])

    def __getitem__(self, index: int) -> tuple:
        if index < 0:
            index += len(self)
        seed = self.sample_seed(index)
        if get_worker_info() is not None:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed & 0xFFFF_FFFF)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: leaves CUDA RNGs alone
            random.seed(seed)
            np.random.seed(seed & 0xFFFF_FFFF)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
