"""``mimkit data fetch NAME``: put a torchvision data set where :func:`build_dataset` reads it.

Library calls never download; this explicit step does, trying in order:

1. a local gzip copy of the IDX files (Fashion-MNIST/MNIST): ``ROOT/fashion-mnist``,
   ``$MIMKIT_CACHE/fashion-mnist`` or Debian's ``/usr/share/datasets/fashion-mnist``;
2. torchvision's own download (needs internet);
3. Fashion-MNIST only: Debian's ``dataset-fashion-mnist`` package (``apt-get download`` +
   ``dpkg -x``, no root needed), for machines that reach a Debian mirror but not the internet.

Files end up in torchvision's layout under ``ROOT`` (default :func:`cache_dir`):
``ROOT/FashionMNIST/raw/train-images-idx3-ubyte`` etc., ``ROOT/cifar-10-batches-py/``.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mimkit.errors import DataError

from .sources import TORCHVISION, cache_dir, canonical_name, data_root

logger = logging.getLogger("mimkit")

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
_IDX_SUBDIR = {"fashion_mnist": "fashion-mnist", "mnist": "mnist"}  # folder of a gzip copy
_CIFAR_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_DEBIAN = {"fashion_mnist": ("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")}
FETCHABLE = tuple(TORCHVISION)


def fetch_command(name: str, root: str | os.PathLike | None = None) -> str:
    """The shell command that fetches ``name`` into ``root``."""
    return f"mimkit data fetch {name}" + (f" --root {root}" if root else "")


def _raw_folder(name: str, folder: Path) -> Path:
    return folder / TORCHVISION[name][0] / "raw"


def is_present(name: str, folder: Path) -> bool:
    """Whether torchvision's files for ``name`` are in ``folder`` (content is checked on load)."""
    if name in _IDX_SUBDIR:
        return all((_raw_folder(name, folder) / f).is_file() for f in IDX_FILES)
    batches = folder / _CIFAR_FOLDER[name]
    return batches.is_dir() and any(batches.iterdir())


def _gzip_copies(name: str, folder: Path, elsewhere: bool) -> list[Path]:
    sub = _IDX_SUBDIR[name]
    inside = [folder / sub, folder]
    return [*inside, cache_dir() / sub, Path("/usr/share/datasets") / sub] if elsewhere else inside


def _install_idx(src: Path, raw: Path) -> None:
    """Copy (decompressing ``.gz``) the four IDX files from ``src`` into ``raw``, each atomically."""
    raw.mkdir(parents=True, exist_ok=True)
    for stem in IDX_FILES:
        gz, plain = src / f"{stem}.gz", src / stem
        tmp = raw / f".{stem}.part"
        with (gzip.open(gz) if gz.is_file() else open(plain, "rb")) as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, raw / stem)  # a file appears only when complete


def unpack_local(name: str, folder: Path, elsewhere: bool = True) -> bool:
    """Lay out a local copy of ``name``'s IDX files in ``folder`` (no network); True if one was
    found. The copy is looked for in ``folder`` and, with ``elsewhere``, in the cache and in
    Debian's ``/usr/share/datasets``."""
    if name not in _IDX_SUBDIR:
        return False
    for src in _gzip_copies(name, folder, elsewhere):
        if all((src / f"{f}.gz").is_file() or (src / f).is_file() for f in IDX_FILES):
            raw = _raw_folder(name, folder)
            logger.info("unpacking %s from %s into %s", name, src, raw)
            try:
                _install_idx(src, raw)
            except OSError as e:
                raise DataError(f"cannot unpack {name} from {src} into {raw}: {e}; "
                                "choose a writable --root / data.root") from None
            return True
    return False


def _torchvision_download(name: str, folder: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name][0])
    for train in (True, False):
        cls(str(folder), train=train, download=True)


def _debian(name: str, folder: Path, apt_update: bool) -> None:
    package, inside = _DEBIAN[name]
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError("apt-get/dpkg not available")
    with tempfile.TemporaryDirectory(prefix="mimkit-deb-") as tmp:
        cmd = ["apt-get", "download", package]
        result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0 and apt_update:
            logger.info("apt-get download failed; running apt-get update (--apt-update)")
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get download {package}: {result.stderr.strip() or result.returncode}")
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} left no .deb")
        subprocess.run(["dpkg", "-x", str(debs[0]), f"{tmp}/x"], check=True, capture_output=True)
        _install_idx(Path(tmp, "x", inside), _raw_folder(name, folder))


def fetch(name: str, root: str | os.PathLike | None = None, *, apt_update: bool = False,
          download: bool = True) -> Path:
    """Make ``name`` loadable from ``root`` (default :func:`cache_dir`); returns the folder.

    ``download=False`` only uses local copies. ``apt_update`` lets the Debian route run
    ``apt-get update`` once when ``apt-get download`` fails (needs root).
    """
    name = canonical_name(name)
    if name not in TORCHVISION:
        raise DataError(f"mimkit data fetch: {name!r} is not fetched; choose from {', '.join(FETCHABLE)} "
                        "(folders and shards are your own files; synthetic data needs no files)")
    folder = data_root(name, root)
    if is_present(name, folder) or (unpack_local(name, folder) and is_present(name, folder)):
        return folder
    if not download:
        raise DataError(f"{name}: no local copy for {folder}; run `{fetch_command(name, root)}` with network access")
    errors = []
    routes = [("torchvision download", _torchvision_download)]
    if name in _DEBIAN:
        routes.append((f"Debian package {_DEBIAN[name][0]}", lambda n, f: _debian(n, f, apt_update)))
    for label, route in routes:
        logger.info("fetching %s into %s: %s", name, folder, label)
        try:
            route(name, folder)
        except Exception as e:  # any failure means: try the next route
            errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            logger.warning("%s failed (%s)", label, errors[-1])
            continue
        if is_present(name, folder):
            return folder
    raise DataError(f"could not fetch {name} into {folder} ({'; '.join(errors)}); copy the files there "
                    "by hand (see docs/data.md)")
