"""WebDataset-style tar shards, read and written with :mod:`tarfile` (no ``webdataset`` needed).

A shard is a plain tar file. Sample ``key`` is the group of consecutive members ``key.ext``
(the key is the member name up to the first dot of its base name, as in WebDataset): here one
image ``key.jpg|png|...`` and, for labeled data, ``key.cls`` holding the class index in ASCII.

* :func:`write_shards` turns an image folder (labels from sub-folders, exactly as
  :class:`~mimkit.data.ImageFolderDataset`) into shards; keys are the folder order's index
  plus the file's path, so sorting keys gives the folder's order and re-running gives the same
  bytes.
* :class:`ShardDataset` is map-style: it scans each local shard's member offsets once (cached
  on disk), then reads sample ``i`` with one seek. This is what the trainer uses, because
  exact resume and world-size-independent batches need random access.
* :class:`IterableShardDataset` streams shards that cannot be seeked (``pipe:CMD``, fsspec URLs
  such as ``s3://...``, or local files), splits them over ranks and DataLoader workers, and
  shuffles with a seeded buffer.

Sources (``data.root``): a directory (its ``*.tar`` files, sorted; ``train/`` and ``test/``
sub-directories select the split), a brace pattern ``shard-{000000..000009}.tar``, a file, a
comma-separated list of these, ``pipe:CMD`` (the command writes a tar to stdout) or a URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

logger = logging.getLogger("mimkit")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm")
INDEX_VERSION = 2
Transform = Callable[[Image.Image], Any] | None


# --------------------------------------------------------------------------------------------
# Naming: sources, brace patterns, keys
# --------------------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → ``[a-000.tar, a-001.tar, a-002.tar]``; also ``{x,y}``; nests."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        if int(hi) < int(lo):
            raise ValueError(f"empty brace range {{{body}}} in {pattern!r}")
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def is_stream_url(source: str) -> bool:
    """True for sources that can only be streamed: ``pipe:...`` or a ``scheme://`` URL."""
    return source.startswith("pipe:") or ("://" in source and not source.startswith("file://"))


def resolve_shards(root: str | os.PathLike | Sequence[str], split: str = "train") -> list[str]:
    """The ordered list of shard sources named by ``root`` (see the module docstring)."""
    if isinstance(root, str | os.PathLike):
        parts = [p.strip() for p in str(root).split(",") if p.strip()]
    else:
        parts = [str(p) for p in root]
    out: list[str] = []
    for part in parts:
        for item in expand_braces(part):
            if is_stream_url(item):
                out.append(item)
                continue
            path = Path(item.removeprefix("file://")).expanduser()
            if path.is_dir():
                split_dir = _split_dir(path, split)
                tars = sorted(p for p in split_dir.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
                if not tars:
                    raise FileNotFoundError(f"no *.tar shards in {split_dir.absolute()}")
                out += [str(p.absolute()) for p in tars]
            elif path.is_file():
                out.append(str(path.absolute()))
            else:
                raise FileNotFoundError(f"shard {path.absolute()} does not exist")
    if not out:
        raise FileNotFoundError(f"no shards named by {root!r}")
    return out


def _split_dir(root: Path, split: str) -> Path:
    """``root/train`` or ``root/test`` (``val``) when present, as for image folders."""
    from mimkit.data.datasets import ImageFolderDataset, _check_split

    return ImageFolderDataset._split_dir(root, _check_split(split))


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` → (``dir/abc``, ``seg.png``): key up to the base name's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def make_key(index: int, relative: str) -> str:
    """``000123_cat_img_001`` for sample 123 from ``cat/img.001.png`` (no dots, fixed-width index)."""
    stem = relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative
    return f"{index:08d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", stem)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class ShardWriteSummary:
    """What :func:`write_shards` wrote."""

    shards: list[str]
    num_samples: int
    classes: list[str]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: same bytes every run
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    images: str | os.PathLike, pattern: str, max_count: int = 10000, max_size: int | None = None,
    split: str = "train",
) -> ShardWriteSummary:
    """Write the images of a folder to tar shards named ``pattern % shard_index``.

    ``images`` is read like ``data.name=folder`` (class sub-folders → labels, ``train/`` and
    ``test/`` select ``split``); each shard holds at most ``max_count`` samples and, if given,
    about ``max_size`` bytes. Image bytes are copied unchanged. A ``classes.json`` beside the
    shards records the class names.
    """
    from mimkit.data.datasets import ImageFolderDataset

    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    try:
        pattern % 0
    except TypeError:
        raise ValueError(f"--out {pattern!r} needs a %d-style field for the shard number, "
                         "e.g. shards/shard-%06d.tar") from None
    folder = ImageFolderDataset(images, split)
    out_dir = Path(pattern % 0).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    written: list[str] = []
    tar: tarfile.TarFile | None = None
    count = size = 0
    tmp: Path | None = None

    def close() -> None:
        if tar is not None:
            tar.close()
            final = Path(pattern % len(written))
            os.replace(tmp, final)  # a shard appears only when complete
            written.append(str(final))

    try:
        for index, (path, label) in enumerate(folder.samples):
            data = Path(path).read_bytes()
            if tar is not None and (count >= max_count or (max_size and size + len(data) > max_size)):
                close()
                tar = None
            if tar is None:
                tmp = Path(pattern % len(written)).with_suffix(".tar.part")
                tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
                count = size = 0
            relative = Path(path).relative_to(folder.root).as_posix()
            key = make_key(index, relative)
            ext = Path(path).suffix.lower().lstrip(".")
            _add_member(tar, f"{key}.{ext}", data)
            if label >= 0:
                _add_member(tar, f"{key}.cls", str(label).encode())
            count, size = count + 1, size + len(data)
        close()
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    (out_dir / "classes.json").write_text(json.dumps({"classes": folder.classes}, indent=1) + "\n")
    return ShardWriteSummary(written, len(folder.samples), list(folder.classes))


# --------------------------------------------------------------------------------------------
# Decoding a sample (shared by both readers)
# --------------------------------------------------------------------------------------------


def image_member(exts: Sequence[str]) -> str | None:
    """The first image extension among a sample's member extensions."""
    return next((e for e in exts if e.lower() in IMAGE_EXTS), None)


def decode_image(data: bytes, mode: str, where: str) -> Image.Image:
    """Decode image bytes fully (so truncation shows here) into ``mode``; errors name ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert(mode)
    except Exception as e:  # PIL raises many types on corrupt data
        raise ValueError(f"{where}: cannot decode image: {type(e).__name__}: {e}") from e


def decode_sample(files: dict[str, bytes], mode: str, where: str) -> tuple[Image.Image, int]:
    """(image, label) from one sample's ``{ext: bytes}``; errors name ``where`` (shard + member)."""
    ext = image_member(list(files))
    if ext is None:
        raise ValueError(f"{where}: no image member (found {', '.join(sorted(files)) or 'nothing'})")
    image = decode_image(files[ext], mode, f"{where}.{ext}")
    label = _parse_label(files["cls"], where, "") if "cls" in files else -1
    return image, label


def _parse_label(data: bytes, where: str, key: str) -> int:
    """The integer in a ``.cls`` member; ``where``/``key`` name it in the error."""
    try:
        return int(data.decode().strip())
    except (UnicodeDecodeError, ValueError):
        member = f" member {key}" if key else ""
        raise ValueError(f"{where}{member}.cls: not an integer label: {data[:20]!r}") from None


def _classes_for(shards: Sequence[str], labels: Sequence[int]) -> list[str]:
    """Class names from a ``classes.json`` beside the first shard, else ``"0".."max label"``."""
    if shards and not is_stream_url(shards[0]):
        meta = Path(shards[0]).parent / "classes.json"
        if meta.is_file():
            try:
                return list(json.loads(meta.read_text())["classes"])
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring unreadable %s", meta)
    top = max(labels, default=-1)
    return [str(c) for c in range(top + 1)]


# --------------------------------------------------------------------------------------------
# Map-style: indexed random access into local shards
# --------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    shard: int  # index into ShardDataset.shards
    key: str
    members: dict[str, tuple[int, int]]  # ext -> (data offset, size)
    label: int  # from the .cls member, -1 without one


IndexEntry = tuple[str, dict[str, tuple[int, int]], int]  # key, {ext: (offset, size)}, label


def index_shard(path: str) -> list[IndexEntry]:
    """``[(key, {ext: (offset, size)}, label), ...]`` in member order; errors name the shard."""
    samples: list[IndexEntry] = []
    try:
        with tarfile.open(path, "r:") as tar:  # "r:" = uncompressed: offsets are seekable
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}, -1))
                samples[-1][1][ext] = (member.offset_data, member.size)
                if ext == "cls":  # labels go into the index: ``targets`` without reading shards
                    label = _parse_label(tar.extractfile(member).read(), f"shard {path}", key)
                    samples[-1] = (key, samples[-1][1], label)
    except tarfile.ReadError as e:
        hint = " (compressed shards cannot be indexed: stream them, or store them uncompressed)" \
            if path.endswith((".gz", ".tgz")) else ""
        raise ValueError(f"cannot index shard {path}: {e}{hint}") from e
    size = os.path.getsize(path)
    for key, members, _ in samples:
        for ext, (offset, length) in members.items():
            if offset + length > size:
                raise ValueError(f"shard {path} is truncated: member {key}.{ext} ends past the file end")
    return samples


def _index_cache_file(path: str) -> Path:
    from mimkit.data.datasets import cache_dir

    st = os.stat(path)
    digest = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "shard-index" / f"{digest[:24]}.json"


def cached_index(path: str) -> list[IndexEntry]:
    """:func:`index_shard`, cached under ``cache_dir()/shard-index`` by path, size and mtime."""
    cache = _index_cache_file(path)
    try:
        data = json.loads(cache.read_text())
        if data.get("version") == INDEX_VERSION:
            return [(k, {e: tuple(v) for e, v in m.items()}, label) for k, m, label in data["samples"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    samples = index_shard(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.part")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "shard": path, "samples": samples}))
        os.replace(tmp, cache)
    except OSError as e:  # a read-only cache only costs a re-scan next time
        logger.debug("cannot cache the index of %s: %s", path, e)
    return samples


class ShardDataset(Dataset):
    """Map-style access to local tar shards: ``dataset[i]`` is ``(image, label)``.

    Samples are in shard order, then member order (for shards from :func:`write_shards`: key
    order, i.e. the image folder's order). File handles are opened lazily per process, so
    the dataset works in DataLoader workers. ``on_corrupt="skip"`` replaces an undecodable
    sample by the next valid one, as the folder dataset does.
    """

    def __init__(
        self, root: str | os.PathLike | Sequence[str], split: str = "train", transform: Transform = None,
        *, in_chans: int = 3, on_corrupt: str = "error",
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.shards = resolve_shards(root, split)
        streamed = [s for s in self.shards if is_stream_url(s)]
        if streamed:
            raise ValueError(f"{streamed[0]} can only be streamed; use IterableShardDataset for pipe:/URL shards")
        self.transform, self.in_chans, self.on_corrupt = transform, in_chans, on_corrupt
        self._mode = "L" if in_chans == 1 else "RGB"
        self.samples: list[_Sample] = []
        for s, path in enumerate(self.shards):
            self.samples += [_Sample(s, *entry) for entry in cached_index(path)]
        if not self.samples:
            raise FileNotFoundError(f"no samples in {len(self.shards)} shard(s) named by {root!r}")
        self.targets = [sample.label for sample in self.samples]
        self.classes = _classes_for(self.shards, self.targets)
        self.num_classes = len(self.classes)
        self._handles: dict[int, IO[bytes]] = {}
        self._pid = os.getpid()
        self._bad: set[int] = set()

    def _read(self, sample: _Sample, ext: str) -> bytes:
        if self._pid != os.getpid():  # forked into a worker: do not share file offsets
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(sample.shard)
        if f is None:
            f = self._handles[sample.shard] = open(self.shards[sample.shard], "rb")
        offset, size = sample.members[ext]
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ValueError(f"shard {self.shards[sample.shard]} member {sample.key}.{ext}: truncated")
        return data

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def where(self, index: int) -> str:
        """``shard <path> member <key>`` for error messages."""
        sample = self.samples[index]
        return f"shard {self.shards[sample.shard]} member {sample.key}"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            sample = self.samples[j]
            try:
                ext = image_member(list(sample.members))
                if ext is None:
                    raise ValueError(f"{self.where(j)}: no image member (found {', '.join(sample.members)})")
                img = decode_image(self._read(sample, ext), self._mode, f"{self.where(j)}.{ext}")
            except (ValueError, OSError) as e:
                if self.on_corrupt == "error":
                    raise RuntimeError(str(e)) from e
                logger.warning("skipping unreadable sample: %s", e)
                self._bad.add(j)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, sample.label
        raise RuntimeError(f"all {n} samples in {len(self.shards)} shard(s) are unreadable")

    def close(self) -> None:
        """Close the open shard files (they reopen on the next access)."""
        for f in self._handles.values():
            f.close()
        self._handles = {}


# --------------------------------------------------------------------------------------------
# Streaming: pipe:/URL/local shards split over ranks and workers, seeded shuffle buffer
# --------------------------------------------------------------------------------------------


def open_stream(source: str) -> IO[bytes]:
    """A readable byte stream for a local path, ``pipe:CMD`` or an fsspec URL."""
    if source.startswith("pipe:"):
        proc = subprocess.Popen(source[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - user command
        return _PipeStream(proc, source)
    if is_stream_url(source):
        try:
            import fsspec
        except ImportError:
            raise RuntimeError(f"reading {source} needs fsspec (pip install fsspec); "
                               "or use pipe:CMD, e.g. 'pipe:curl -sL URL'") from None
        return fsspec.open(source, "rb").open()
    return open(source.removeprefix("file://"), "rb")


class _PipeStream(io.RawIOBase):
    """A subprocess's stdout that raises, naming the command, if it exits with an error."""

    def __init__(self, proc: subprocess.Popen, source: str) -> None:
        self.proc, self.source = proc, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.proc.stdout.readinto(buffer)
        if n == 0 and self.proc.wait() != 0:
            raise OSError(f"{self.source}: command exited with status {self.proc.returncode}")
        return n

    def close(self) -> None:
        if not self.closed:
            self.proc.stdout.close()
            if self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait()
        super().close()


def iter_tar_samples(source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for each sample of a shard, reading it front to back."""
    stream = open_stream(source)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, files = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_member_name(member.name)
                if k != key and files:
                    yield key, files
                    files = {}
                key = k
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
            if files:
                yield key, files
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"cannot read shard {source}: {e}") from e
    finally:
        stream.close()


def consumer_id() -> tuple[int, int]:
    """``(id, count)`` of this reader among all ranks × DataLoader workers."""
    import torch.distributed as dist
    from torch.utils.data import get_worker_info

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + worker, world * workers


class IterableShardDataset(IterableDataset):
    """Streams ``(image, label)`` from shards, split over ranks and DataLoader workers.

    Each epoch the shard list is permuted with ``(seed, epoch)`` (same order on every
    reader). With at least as many shards as readers, reader ``r`` of ``R`` takes shards
    ``r, r+R, ...``; otherwise every reader scans all shards and keeps samples
    ``r, r+R, ...`` — either way each sample is read by exactly one reader. ``shuffle``
    (buffer size; 0 = off) shuffles within a reader with a generator seeded by
    ``(seed, epoch, r)``.
    """

    def __init__(
        self, root: str | Sequence[str], split: str = "train", transform: Transform = None, *,
        in_chans: int = 3, on_corrupt: str = "error", shuffle: int = 0, seed: int = 0,
        shuffle_shards: bool | None = None, split_by: str = "auto",
    ) -> None:
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if split_by not in ("auto", "shard", "sample"):
            raise ValueError(f"split_by must be auto, shard or sample, got {split_by!r}")
        self.shards = resolve_shards(root, split)
        self.transform, self.in_chans, self.on_corrupt = transform, in_chans, on_corrupt
        self.shuffle, self.seed, self.epoch, self.split_by = shuffle, seed, 0, split_by
        self.shuffle_shards = shuffle > 0 if shuffle_shards is None else shuffle_shards
        self._mode = "L" if in_chans == 1 else "RGB"
        self.classes = _classes_for(self.shards, [])
        self.num_classes = len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle :meth:`__iter__` reproduces."""
        self.epoch = epoch

    def assignment(self, reader: int, readers: int) -> tuple[list[str], int, int]:
        """(shards to read, keep every ``k``-th sample, starting at ``offset``) for one reader."""
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{self.seed}-{self.epoch}-shards").shuffle(order)
        by_shard = self.split_by == "shard" or (self.split_by == "auto" and len(order) >= readers)
        if by_shard:
            return order[reader::readers], 1, 0
        return order, readers, reader

    def raw_samples(self, reader: int | None = None, readers: int | None = None) -> Iterator[tuple[str, str, dict]]:
        """``(shard, key, {ext: bytes})`` for one reader (this process's by default), unshuffled."""
        if reader is None or readers is None:
            reader, readers = consumer_id()
        shards, every, offset = self.assignment(reader, readers)
        n = 0
        for shard in shards:
            for key, files in iter_tar_samples(shard):
                if n % every == offset:
                    yield shard, key, files
                n += 1

    def _shuffled(self, items: Iterator, reader: int) -> Iterator:
        if self.shuffle <= 1:
            yield from items
            return
        rng = random.Random(f"{self.seed}-{self.epoch}-{reader}")
        buffer: list = []
        for item in items:
            if len(buffer) < self.shuffle:
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        reader, readers = consumer_id()
        for shard, key, files in self._shuffled(self.raw_samples(reader, readers), reader):
            try:
                img, label = decode_sample(files, self._mode, f"shard {shard} member {key}")
            except ValueError as e:
                if self.on_corrupt == "error":
                    raise RuntimeError(str(e)) from e
                logger.warning("skipping unreadable sample: %s", e)
                continue
            yield (self.transform(img) if self.transform is not None else img), label
