"""WebDataset shards: written with ``webdataset.ShardWriter``, read with ``wids`` random access.

A shard folder (``mimkit make-shards``) holds ``shard-000000.tar``, ... in WebDataset's layout
(sample ``key`` = members ``key.jpg|png|...`` and, for labeled data, ``key.cls``) plus
``index.json``, the ``wids`` dataset description (``wids_version``, ``shardlist`` with each
shard's ``url`` and ``nsamples``; mimkit adds ``classes`` and per-shard ``labels``).
``train/`` and ``test/`` sub-folders, each with its own index, are the source splits.

Training reads shards by index (``wids.ShardListDataset``), so the sampler's order, per-sample
seeding and exact resume work exactly as for image folders. Streaming (``pipe:`` commands,
``s3://``/``https://`` URLs) cannot give random access and is refused: copy the shards to a
local folder first.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from mimkit.errors import DataError

from .datasets import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    EncodedFile,
    ImageFolderDataset,
    Transform,
    load_image,
    reads_bytes,
)
from .sources import check_in_chans

logger = logging.getLogger("mimkit")

INDEX_NAME = "index.json"
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def is_stream_url(source: str) -> bool:
    """True for sources that can only be streamed: ``pipe:...`` or a ``scheme://`` URL."""
    return source.startswith("pipe:") or ("://" in source and not source.startswith("file://"))


def _refuse_streaming(root: str) -> None:
    if is_stream_url(root) or "{" in root or root.endswith((".tar", ".tgz", ".tar.gz")):
        raise DataError(
            f"data.root={root}: mimkit reads shards by index for exact resume and cannot stream them; copy "
            f"the shards to a local folder and index it (`widsindex create -o DIR/{INDEX_NAME} DIR/*.tar`), "
            "or write them with `mimkit make-shards`"
        )


def index_path(root: str | os.PathLike, split: str) -> Path | None:
    """The ``index.json`` of source ``split`` under ``root`` (None: no such split)."""
    _refuse_streaming(str(root))
    root = Path(str(root).removeprefix("file://")).expanduser().absolute()
    if root.suffix == ".json":
        return root if split == "train" else None
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist; expected a folder written by `mimkit make-shards` "
                        f"(shards plus {INDEX_NAME})")
    if (root / "train").is_dir():
        folder = root / "train" if split == "train" else next(
            (root / n for n in ("test", "val") if (root / n).is_dir()), None)
    else:
        folder = root if split == "train" else None
    if folder is None:
        return None
    if not (folder / INDEX_NAME).is_file():
        raise DataError(f"data.root: no {INDEX_NAME} in {folder}; write shards with `mimkit make-shards`, or index "
                        f"existing ones with `widsindex create -o {folder / INDEX_NAME} {folder}/*.tar`")
    return folder / INDEX_NAME


def has_split(root: str | os.PathLike, split: str) -> bool:
    """Whether ``root`` holds shards for source ``split``."""
    return index_path(root, split) is not None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class ShardWriteSummary:
    """What :func:`write_shards` wrote."""

    shards: list[str]
    num_samples: int
    classes: list[str]
    index: str


def make_key(index: int, relative: str) -> str:
    """``00000123_cat_img_001`` for sample 123 from ``cat/img.001.png``: no dots (WebDataset
    splits the key at the first dot), a fixed-width index so keys sort in folder order."""
    stem = relative.rsplit(".", 1)[0]
    return f"{index:08d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def write_shards(images: str | os.PathLike, out: str | os.PathLike, max_count: int = 10000,
                 max_size: int | None = None, split: str = "train") -> ShardWriteSummary:
    """Write the images of a folder to ``out/shard-%06d.tar`` plus ``out/index.json``.

    ``images`` is read like ``data.name=folder`` (class sub-folders give labels, ``train/`` and
    ``test/`` select ``split``); each shard holds at most ``max_count`` samples and, if given,
    about ``max_size`` bytes. Image bytes are copied unchanged; tar metadata is fixed, so the
    same folder gives the same bytes.
    """
    import webdataset as wds

    if max_count < 1:
        raise DataError(f"--max-count must be >= 1, got {max_count}")
    out = Path(out)
    if out.suffix == ".tar" or "%" in out.name:
        raise DataError(f"--out {out}: give a folder; shards are named shard-000000.tar, ... inside it")
    folder = ImageFolderDataset(images, split)
    out.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    labels: list[int] = []

    def done(fname: str) -> None:  # called by ShardWriter as each shard is closed
        n = writer.count
        written.append({"url": Path(fname).name, "nsamples": n, "filesize": os.path.getsize(fname),
                        "labels": labels[len(labels) - n:] if n else []})

    pattern = str(out / "shard-%06d.tar")
    with contextlib.redirect_stdout(io.StringIO()):  # ShardWriter prints each shard's name
        writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size or 3e9, post=done,
                                 verbose=0, mtime=0, user="", group="", mode=0o444)
        for index, (path, label) in enumerate(folder.samples):
            path = Path(path)
            sample = {"__key__": make_key(index, path.relative_to(folder.root).as_posix()),
                      path.suffix.lower().lstrip("."): path.read_bytes()}
            if label >= 0:
                sample["cls"] = str(label).encode()
            writer.write(sample)  # may close the previous shard first (done() reads labels so far)
            labels.append(label)
        writer.close()
    written = [w for w in written if w["nsamples"]]
    desc = {"wids_version": 1, "name": Path(images).name, "classes": list(folder.classes), "shardlist": written}
    tmp = out / f".{INDEX_NAME}.part"
    tmp.write_text(json.dumps(desc, indent=1) + "\n")
    os.replace(tmp, out / INDEX_NAME)  # the index appears last: a half-written folder has none
    return ShardWriteSummary([str(out / w["url"]) for w in written], len(folder.samples),
                             list(folder.classes), str(out / INDEX_NAME))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class ShardDataset(Dataset):
    """Map-style access to local shards through ``wids.ShardListDataset``: ``ds[i]`` is
    ``(image, label)``, in index order (for ``make-shards`` output: the folder's order).

    The ``wids`` reader (memory-mapped shards) is opened lazily in each process, so the data
    set pickles into DataLoader workers. An undecodable image raises
    :class:`~mimkit.data.datasets.CorruptImageError` naming shard and key.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Transform = None, *,
                 in_chans: int = 3) -> None:
        check_in_chans(in_chans)
        path = index_path(root, split)
        if path is None:
            raise DataError(f"data.root: {root} has no {split} shards")
        self.index = path
        try:
            desc = json.loads(path.read_text())
            shardlist = desc["shardlist"]
            self.lengths = [int(s["nsamples"]) for s in shardlist]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not a wids index ({type(e).__name__}: {e}); "
                            "write it again with `mimkit make-shards`") from None
        self.shards = [str((path.parent / s["url"]).absolute()) for s in shardlist]
        if not sum(self.lengths):
            raise DataError(f"data.root: {path} lists no samples")
        if all("labels" in s for s in shardlist):
            self.labels = np.asarray([label for s in shardlist for label in s["labels"]], dtype=np.int64)
        else:  # an index from another tool: read the .cls members once
            self.labels = np.asarray([self._label(self._sample(i)) for i in range(len(self))], dtype=np.int64)
        self.classes = list(desc.get("classes") or [str(c) for c in range(int(self.labels.max()) + 1)])
        self.num_classes = len(self.classes)
        self.transform, self.in_chans = transform, in_chans
        self._mode = "L" if in_chans == 1 else "RGB"

    def _reader(self):
        if getattr(self, "_pid", None) != os.getpid():  # a new process: open its own reader
            import wids

            # wids prints a summary to stderr and, by default, copies local shards into a cache;
            # the identity localname reads them in place.
            with contextlib.redirect_stderr(io.StringIO()):
                self._wids = wids.ShardListDataset(str(self.index), localname=lambda url: url, transformations=[])
            self._pid = os.getpid()
        return self._wids

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_wids", "_pid")}

    def __len__(self) -> int:
        return int(sum(self.lengths))

    def _sample(self, index: int) -> dict:
        try:
            return self._reader()[index]
        except (OSError, ValueError, AssertionError) as e:  # wids asserts on malformed shards
            raise DataError(f"cannot read sample {index} of {self.index.parent}: {type(e).__name__}: {e}") from None

    @staticmethod
    def _label(sample: dict) -> int:
        data = sample.get(".cls")
        return int(bytes(data.getvalue()).decode().strip()) if data is not None else -1

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self._sample(index)
        ext = next((e for e in sample if e.lstrip(".").lower() in _IMAGE_EXTS), None)
        where = f"shard {sample.get('__shard__')} key {sample.get('__key__')}"
        if ext is None:
            raise CorruptImageError(f"{where}: no image member")
        if reads_bytes(self.transform):
            file = EncodedFile(bytes(sample[ext].getvalue()), f"{where}{ext}")
            return self.transform(file), int(self.labels[index])
        img = load_image(sample[ext], self._mode, f"{where}{ext}")
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])
