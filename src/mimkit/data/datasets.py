"""Datasets for mimkit: IDX (Fashion-)MNIST, CIFAR pickles, image folders and synthetic data.

Every dataset returns ``(image, label)``: ``image`` is whatever ``transform`` returns (a PIL
image when ``transform`` is None) and ``label`` is an ``int`` (-1 for unlabeled data). Every
dataset exposes ``num_classes`` (0 if unlabeled) and ``in_chans`` (native channel count).
"""

from __future__ import annotations

import contextlib
import difflib
import gzip
import logging
import math
import os
import pickle
import random
import shutil
import struct
import subprocess
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger("mimkit")

DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10", "cifar100", "folder", "shards", "synthetic")
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
}

Transform = Callable[[Image.Image], Any] | None


# --------------------------------------------------------------------------------------------
# Helpers shared by all datasets
# --------------------------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in DATASET_NAMES:
        close = difflib.get_close_matches(key, DATASET_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown dataset {name!r}; valid names are {', '.join(DATASET_NAMES)}.{hint}"
        )
    return key


def _check_split(split: str) -> str:
    split = {"val": "test"}.get(split, split)
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
    """Per-channel normalization ``(mean, std)`` for ``name``.

    Native channel count by default; pass ``in_chans`` to get statistics matching a channel
    conversion (gray repeated to RGB, or RGB averaged to gray).
    """
    mean, std = _STATS[_canonical_name(name)]
    if in_chans is not None:
        mean, std = _match_channels(mean, in_chans), _match_channels(std, in_chans)
    return mean, std


def cache_dir() -> Path:
    """Download cache: ``$MIMKIT_CACHE`` or ``~/.cache/mimkit``."""
    return Path(os.environ.get("MIMKIT_CACHE") or Path.home() / ".cache" / "mimkit").expanduser()


class ArrayDataset(Dataset):
    """In-memory uint8 images, shape (N, H, W) (gray) or (N, H, W, C), with integer labels."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        transform: Transform = None,
        classes: list[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = num_classes
        self.in_chans = 1 if images.ndim == 3 else int(images.shape[-1])
        self.transform = transform
        self.classes = classes if classes is not None else [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


# --------------------------------------------------------------------------------------------
# IDX files: MNIST and Fashion-MNIST
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_IDX_FILES = tuple(f"{stem}.gz" for pair in _IDX_FILES.values() for stem in pair)


@dataclass(frozen=True)
class _IdxSource:
    subdir: str  # folder name inside the cache
    system_dirs: tuple[str, ...]  # where a distribution package installs the files
    deb_package: str | None
    url: str


_IDX_SOURCES = {
    # `dpkg -c` of dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian bookworm) lists
    # ./usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    "fashion_mnist": _IdxSource(
        subdir="fashion-mnist",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        deb_package="dataset-fashion-mnist",
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ),
    # Debian has no MNIST package: only root / cache / upstream.
    "mnist": _IdxSource(
        subdir="mnist",
        system_dirs=(),
        deb_package=None,
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
    ),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into a numpy array.

    Raises ``ValueError`` naming the file if it is truncated or not an IDX file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"Cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated: header needs {header} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"IDX file {path} is truncated or corrupt: shape {dims} needs {expected} bytes, "
            f"file has {len(data)}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(folder: Path, splits: Sequence[str] = ("train", "test")) -> bool:
    return all(_idx_file(folder, stem) for s in splits for stem in _IDX_FILES[s])


def find_idx_root(
    name: str, root: str | os.PathLike | None = None, *, download: bool = True
) -> Path:
    """Locate the folder holding the IDX files of ``"fashion_mnist"`` or ``"mnist"``.

    With ``root``: use it (or its ``fashion-mnist``/``mnist`` sub-folder). Without: search the
    Debian package location, then ``cache_dir()``; if still missing and ``download`` is True,
    fetch into the cache (Debian package first, then the upstream URLs).
    """
    source = _IDX_SOURCES[_canonical_name(name)]
    if root is not None:
        for folder in (Path(root), Path(root) / source.subdir):
            if _has_idx_files(folder, ("train",)) or _has_idx_files(folder, ("test",)):
                return folder
        raise FileNotFoundError(
            f"No {name} IDX files in {root}; expected {', '.join(_ALL_IDX_FILES)} "
            "(gzip-compressed or not)"
        )
    cache = cache_dir() / source.subdir
    for folder in (*map(Path, source.system_dirs), cache):
        if _has_idx_files(folder):
            logger.debug("Found %s in %s", name, folder)
            return folder
    if not download:
        raise FileNotFoundError(
            f"{name} not found in {', '.join([*source.system_dirs, str(cache)])}"
        )
    _fetch_idx(name, source, cache)
    return cache


@contextlib.contextmanager
def _atomic_writer(dst: Path, validate: Callable[[Path], Any] | None = None) -> Iterator[IO]:
    """Write to a temp file next to ``dst``, validate it, then ``os.replace`` it into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if validate is not None:
            validate(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


_apt_updated = False


def _apt_download(package: str, workdir: Path) -> Path:
    """``apt-get download`` a package into ``workdir`` (running ``apt-get update`` once if root)."""
    global _apt_updated
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("apt-get/dpkg not available")
    cmd = ["apt-get", "download", package]
    result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0 and not _apt_updated and hasattr(os, "geteuid") and os.geteuid() == 0:
        logger.info("apt-get download failed (%s); running apt-get update", result.stderr.strip())
        _apt_updated = True
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get download {package} failed: {result.stderr.strip()}")
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no .deb in {workdir}")
    return debs[0]


def _fetch_from_debian(source: _IdxSource, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="mimkit-deb-") as tmp:
        logger.info("Downloading Debian package %s", source.deb_package)
        deb = _apt_download(source.deb_package, Path(tmp))
        subprocess.run(["dpkg", "-x", str(deb), f"{tmp}/x"], check=True, capture_output=True)
        extracted = Path(tmp, "x", source.system_dirs[0].lstrip("/"))
        for fname in _ALL_IDX_FILES:
            logger.info("Installing %s into %s", fname, dest)
            with open(extracted / fname, "rb") as src, _atomic_writer(dest / fname, read_idx) as f:
                shutil.copyfileobj(src, f)


def _fetch_from_upstream(source: _IdxSource, dest: Path) -> None:
    for fname in _ALL_IDX_FILES:
        if _idx_file(dest, fname.removesuffix(".gz")):
            continue
        logger.info("Downloading %s%s", source.url, fname)
        with (
            urllib.request.urlopen(source.url + fname, timeout=60) as response,
            _atomic_writer(dest / fname, read_idx) as f,
        ):
            shutil.copyfileobj(response, f)


def _fetch_idx(name: str, source: _IdxSource, dest: Path) -> None:
    logger.info("%s not found locally; fetching into %s", name, dest)
    errors = []
    fetchers = [("upstream", _fetch_from_upstream)]
    if source.deb_package:
        fetchers.insert(0, (f"Debian package {source.deb_package}", _fetch_from_debian))
    for label, fetch in fetchers:
        try:
            fetch(source, dest)
        except Exception as e:  # any failure means: try the next source
            logger.warning("Fetching %s from %s failed: %s", name, label, e)
            errors.append(f"{label}: {e}")
            continue
        if _has_idx_files(dest):
            logger.info("%s is ready in %s", name, dest)
            return
    hint = f", or run `apt-get install {source.deb_package}`" if source.deb_package else ""
    raise RuntimeError(
        f"Could not fetch {name} ({'; '.join(errors)}). Put {', '.join(_ALL_IDX_FILES)} into "
        f"{dest} or pass root=<folder>{hint}."
    )


def _load_idx(name: str, root: str | None, split: str, transform: Transform) -> ArrayDataset:
    folder = find_idx_root(name, root)
    stems = _IDX_FILES[split]
    paths = [_idx_file(folder, stem) for stem in stems]
    if None in paths:
        raise FileNotFoundError(f"Missing {split} files in {folder}: expected {', '.join(stems)}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8:
        raise ValueError(
            f"Unexpected IDX layout: {paths[0]} {images.dtype}{images.shape}, "
            f"{paths[1]} {labels.dtype}{labels.shape}"
        )
    logger.debug("Loaded %d %s %s images from %s", len(images), name, split, folder)
    return ArrayDataset(images, labels, num_classes=10, transform=transform)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle format)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_key: bytes
    meta: str
    names_key: bytes
    num_classes: int


_CIFAR = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        "batches.meta",
        b"label_names",
        10,
    ),
    "cifar100": _CifarLayout(
        "cifar-100-python", ("train",), ("test",), b"fine_labels", "meta", b"fine_label_names", 100
    ),
}


def _unpickle(path: Path) -> dict:
    """Load a CIFAR batch. These are Python pickles: only load them from trusted sources."""
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR batch (got {type(obj).__name__})")
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _load_cifar(name: str, root: str | None, split: str, transform: Transform) -> ArrayDataset:
    """CIFAR from its python-pickle batches. Pickles can run code: use trusted files only."""
    layout = _CIFAR[name]
    files = getattr(layout, split)
    candidates = [Path(root), Path(root) / layout.folder] if root else [cache_dir() / layout.folder]
    folder = next((c for c in candidates if all((c / f).is_file() for f in files)), None)
    if folder is None:
        raise FileNotFoundError(
            f"No {name} {split} batches ({', '.join(files)}) in {' or '.join(map(str, candidates))}"
        )
    images, labels = [], []
    for fname in files:
        batch = _unpickle(folder / fname)
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{folder / fname}: expected data of shape (N, 3072), got {data.shape}"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[layout.label_key], dtype=np.int64))
    classes = None
    if (folder / layout.meta).is_file():
        names = _unpickle(folder / layout.meta).get(layout.names_key)
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ArrayDataset(
        np.ascontiguousarray(np.concatenate(images)),
        np.concatenate(labels),
        num_classes=layout.num_classes,
        transform=transform,
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _scan_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if _is_image(p)), key=lambda p: p.as_posix())


class ImageFolderDataset(Dataset):
    """Recursive image folder; labels from top-level sub-folder names when there are any.

    ``root/train`` + ``root/test`` (or ``root/val``) select the split; otherwise the whole folder
    serves both splits. ``on_corrupt="skip"`` replaces unreadable images by the next valid one.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Transform = None,
        *,
        on_corrupt: str = "error",
        in_chans: int = 3,
    ) -> None:
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        root = Path(root).expanduser().absolute()  # error messages show full paths
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {root} does not exist")
        self.root = self._split_dir(root, _check_split(split))
        self.transform, self.on_corrupt, self.in_chans = transform, on_corrupt, in_chans
        self._mode = "L" if in_chans == 1 else "RGB"
        self._bad: set[int] = set()

        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        per_class = [(d.name, _scan_images(d)) for d in subdirs]
        per_class = [(c, files) for c, files in per_class if files]
        if per_class:
            loose = [p for p in self.root.iterdir() if _is_image(p)]
            if loose:
                logger.warning(
                    "Ignoring %d images directly in %s (not in a class folder)",
                    len(loose),
                    self.root,
                )
            self.classes = [c for c, _ in per_class]
            self.samples = [(p, label) for label, (_, fs) in enumerate(per_class) for p in fs]
        else:
            self.classes = []
            self.samples = [(p, -1) for p in _scan_images(self.root)]
        self.num_classes = len(self.classes)
        if not self.samples:
            raise FileNotFoundError(
                f"No images found in {self.root}; accepted extensions (any case): "
                f"{', '.join(IMAGE_EXTENSIONS)}"
            )

    @staticmethod
    def _split_dir(root: Path, split: str) -> Path:
        if not (root / "train").is_dir():
            return root
        if split == "train":
            return root / "train"
        for name in ("test", "val"):
            if (root / name).is_dir():
                return root / name
        raise FileNotFoundError(f"{root} has a train/ folder but no test/ or val/ folder")

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: Path) -> Image.Image:
        with Image.open(path) as img:
            return img.convert(self._mode)  # forces decoding, so truncation is caught here

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            path, label = self.samples[j]
            try:
                img = self._load(path)
            except Exception as e:  # PIL raises many types on corrupt files
                reason = f"{type(e).__name__}: {e}"
                if self.on_corrupt == "error":
                    raise RuntimeError(f"Cannot read image {path}: {reason}") from e
                logger.warning("Skipping unreadable image %s (%s)", path, reason)
                self._bad.add(j)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, label
        raise RuntimeError(f"All {n} images in {self.root} are unreadable")


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


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
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.size, self.img_size, self.in_chans, self.seed = size, img_size, in_chans, seed
        self.num_classes, self.transform = num_classes, transform
        self.classes = [f"class_{c}" for c in range(num_classes)]
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
# Entry point and per-sample seeding
# --------------------------------------------------------------------------------------------


def build_dataset(
    name: str,
    root: str | None,
    split: str,
    transform: Transform = None,
    *,
    on_corrupt: str = "error",
    synthetic_size: int = 512,
    img_size: int = 32,
    in_chans: int = 3,
    seed: int = 0,
) -> Dataset:
    """Build one of ``DATASET_NAMES`` for ``split`` ("train" or "test").

    ``on_corrupt`` applies to "folder" and "shards"; ``synthetic_size``/``img_size``/``seed`` to
    "synthetic"; ``in_chans`` to "folder", "shards" and "synthetic" (the others keep their native
    channels). "shards": local shards are map-style (:class:`~mimkit.data.shards.ShardDataset`);
    ``pipe:``/URL roots stream (:class:`~mimkit.data.shards.IterableShardDataset`).
    """
    key = _canonical_name(name)
    split = _check_split(split)
    if key in _IDX_SOURCES:
        return _load_idx(key, root, split, transform)
    if key in _CIFAR:
        return _load_cifar(key, root, split, transform)
    if key == "folder":
        if root is None:
            raise ValueError("The 'folder' dataset needs root=<image folder>")
        return ImageFolderDataset(root, split, transform, on_corrupt=on_corrupt, in_chans=in_chans)
    if key == "shards":
        from .shards import IterableShardDataset, ShardDataset, is_stream_url, resolve_shards

        if root is None:
            raise ValueError("The 'shards' dataset needs root=<directory, shard-{000000..000009}.tar, or pipe:CMD>")
        streamed = any(is_stream_url(s) for s in resolve_shards(root, split))
        cls = IterableShardDataset if streamed else ShardDataset
        return cls(root, split, transform, in_chans=in_chans, on_corrupt=on_corrupt)
    return SyntheticDataset(synthetic_size, img_size, in_chans, seed, split, transform)


class SeededDataset(Dataset):
    """Wraps a dataset so sample i's random augmentation depends only on (seed, epoch, i).

    Seeds torch (CPU), ``random`` and numpy for the duration of each ``__getitem__`` and
    restores the previous RNG states afterwards, so results do not depend on the number of
    workers or processes. Call ``set_epoch`` before each epoch; with DataLoader
    ``persistent_workers=True`` the workers keep their own copy, so recreate the loader instead.
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
