import gzip
import io
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.data import (
    ImageFolderDataset,
    build_dataset,
    dataset_stats,
    find_idx_root,
    read_idx,
)
from mimkit.data import datasets as D

# ------------------------------------------------------------------------------------- helpers

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}


def write_idx(path: Path, array: np.ndarray, gz: bool | None = None) -> Path:
    dtype = np.dtype(">i4") if array.dtype.kind == "i" else np.dtype(np.uint8)
    header = bytes([0, 0, IDX_CODES[dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(dtype).tobytes()
    gz = path.suffix == ".gz" if gz is None else gz
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_idx_folder(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    ext = ".gz" if gz else ""
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        data[split] = (images, labels)
    return data


def png_bytes(color=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color=(200, 10, 10), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color, size))
    return path


# ----------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "img", images, gz)), images)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "ints", ints, gz))
    assert out.dtype == np.int32 and out.dtype.isnative and out.tolist() == [1, -2, 70000]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_from_root(tmp_path, gz):
    data = make_idx_folder(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = build_dataset("fashion_mnist", str(tmp_path), split)
        images, labels = data[split]
        assert len(ds) == len(images) and ds.num_classes == 10 and ds.in_chans == 1
        img, label = ds[3]
        assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), images[3])
        assert type(label) is int and label == labels[3]
    # the parent of a "mnist" folder is accepted too, and a transform is applied
    make_idx_folder(tmp_path / "p" / "mnist", gz=gz)
    ds = build_dataset("mnist", str(tmp_path / "p"), "test", transform=lambda im: im.size)
    assert ds[0][0] == (28, 28)


def test_truncated_idx_names_file(tmp_path):
    good = np.zeros((10, 28, 28), dtype=np.uint8)
    raw = write_idx(tmp_path / "raw-idx3-ubyte", good, gz=False)
    raw.write_bytes(raw.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(raw)
    assert str(raw) in str(e.value)

    gz = write_idx(tmp_path / "zipped-idx3-ubyte.gz", good)
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(ValueError) as e:
        read_idx(gz)
    assert str(gz) in str(e.value)

    bad = tmp_path / "notidx"
    bad.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)


def test_idx_missing_root_lists_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("fashion_mnist", str(tmp_path), "train")
    assert str(tmp_path) in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)


def test_find_idx_root_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        find_idx_root("mnist", download=False)
    make_idx_folder(tmp_path / "mnist")
    assert find_idx_root("mnist", download=False) == tmp_path / "mnist"
    assert len(build_dataset("mnist", None, "train")) == 12


def test_upstream_fetch_is_atomic(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_idx_folder(src)
    served = {f.name: f.read_bytes() for f in src.iterdir()}
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(D.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "cache" / "mnist"

    # a truncated download must never land in the cache
    served["t10k-images-idx3-ubyte.gz"] = served["t10k-images-idx3-ubyte.gz"][:-30]
    with pytest.raises(RuntimeError, match="Could not fetch mnist"):
        find_idx_root("mnist")
    assert not (dest / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(dest.glob(".*"))  # no temp files left behind

    served["t10k-images-idx3-ubyte.gz"] = (src / "t10k-images-idx3-ubyte.gz").read_bytes()
    assert find_idx_root("mnist") == dest
    assert urls[0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert sorted(p.name for p in dest.iterdir()) == sorted(served)


def test_apt_download_updates_lists_once(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None, **kwargs):
        calls.append(cmd[1])
        if cmd[1:] == ["download", "dataset-fashion-mnist"] and "update" in calls:
            (Path(cwd) / "dataset-fashion-mnist_1.0_all.deb").write_bytes(b"deb")
            return D.subprocess.CompletedProcess(cmd, 0, "", "")
        return D.subprocess.CompletedProcess(cmd, 100 * (cmd[1] == "download"), "", "E: no pkg")

    monkeypatch.setattr(D.subprocess, "run", fake_run)
    monkeypatch.setattr(D.shutil, "which", lambda exe: f"/usr/bin/{exe}")
    monkeypatch.setattr(D.os, "geteuid", lambda: 0, raising=False)
    monkeypatch.setattr(D, "_apt_updated", False)
    deb = D._apt_download("dataset-fashion-mnist", tmp_path)
    assert deb.name == "dataset-fashion-mnist_1.0_all.deb"
    assert calls == ["download", "update", "download"]
    with pytest.raises(RuntimeError, match="no pkg"):  # no second `apt-get update`
        D._apt_download("dataset-other", tmp_path)
    assert calls[3:] == ["download"]


_real_fmnist = None
try:
    _real_fmnist = find_idx_root("fashion_mnist", download=False)
except FileNotFoundError:
    pass


@pytest.mark.skipif(_real_fmnist is None, reason="real Fashion-MNIST not available locally")
def test_real_fashion_mnist():
    train = build_dataset("fashion_mnist", str(_real_fmnist), "train")
    test = build_dataset("fashion_mnist", str(_real_fmnist), "test")
    assert (len(train), len(test)) == (60000, 10000)
    for ds in (train, test):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert np.bincount(ds.labels).min() == len(ds) // 10  # balanced classes
    img, label = train[0]
    assert img.mode == "L" and img.size == (28, 28) and 0 <= label < 10


# --------------------------------------------------------------------------------------- CIFAR


def write_cifar_batch(path: Path, n: int, label_key: str, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key.encode(): labels, b"batch_label": b"x"}, f)
    return data, labels


def test_cifar10_fake_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [write_cifar_batch(folder / f"data_batch_{i}", 3, "labels", i) for i in range(1, 6)]
    test_data, test_labels = write_cifar_batch(folder / "test_batch", 4, "labels", 9)
    names = [f"name{i}".encode() for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)

    for root in (folder, tmp_path):  # the batch folder or its parent
        ds = build_dataset("cifar10", str(root), "train")
        assert len(ds) == 15 and ds.num_classes == 10 and ds.in_chans == 3
        assert ds.classes[3] == "name3"
    img, label = ds[4]  # second image of data_batch_2
    data, labels = train[1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == labels[1]
    pixel = np.asarray(img)[5, 7]  # row 5, column 7
    assert pixel.tolist() == [data[1, c * 1024 + 5 * 32 + 7] for c in range(3)]

    test = build_dataset("cifar10", str(tmp_path), "test")
    assert len(test) == 4 and [test[i][1] for i in range(4)] == test_labels


def test_cifar100_fake_batches(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 6, "fine_labels", 0)
    write_cifar_batch(folder / "test", 2, "fine_labels", 1)
    ds = build_dataset("cifar100", str(tmp_path), "train")
    assert len(ds) == 6 and ds.num_classes == 100 and ds.classes[99] == "99"
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        build_dataset("cifar10", str(tmp_path), "train")


# -------------------------------------------------------------------------------------- folder


def test_folder_labels_from_subfolders(tmp_path):
    write_png(tmp_path / "dog" / "b.png", (0, 255, 0))
    write_png(tmp_path / "dog" / "a.PNG", (0, 0, 255))
    write_png(tmp_path / "cat" / "nested" / "deep" / "z.png", (255, 0, 0))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    ds = build_dataset("folder", str(tmp_path), "train")
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 3
    assert [label for _, label in ds.samples] == [0, 1, 1]
    assert [p.name for p, _ in ds.samples] == ["z.png", "a.PNG", "b.png"]
    img, label = ds[1]
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [0, 0, 255] and label == 1
    gray = build_dataset("folder", str(tmp_path), "test", in_chans=1)
    assert gray[0][0].mode == "L" and gray.in_chans == 1


def test_folder_unlabeled_and_splits(tmp_path):
    write_png(tmp_path / "flat" / "x.png")
    Image.new("RGB", (5, 5)).save(tmp_path / "flat" / "y.BMP", format="BMP")
    ds = build_dataset("folder", str(tmp_path / "flat"), "train")
    assert ds.num_classes == 0 and ds[0][1] == -1 and len(ds) == 2

    write_png(tmp_path / "split" / "train" / "a" / "1.png")
    write_png(tmp_path / "split" / "train" / "b" / "2.png")
    write_png(tmp_path / "split" / "val" / "a" / "3.png")
    train = build_dataset("folder", str(tmp_path / "split"), "train")
    test = build_dataset("folder", str(tmp_path / "split"), "test")
    assert len(train) == 2 and len(test) == 1 and test.samples[0][0].name == "3.png"


def test_folder_corrupt_images(tmp_path, caplog):
    write_png(tmp_path / "a_good.png")
    (tmp_path / "b_truncated.png").write_bytes(png_bytes(size=(64, 64))[:-40])
    (tmp_path / "c_text.jpg").write_text("this is not a jpeg")
    write_png(tmp_path / "d_good.png", (1, 2, 3))

    ds = build_dataset("folder", str(tmp_path), "train")
    for i, name in ((1, "b_truncated.png"), (2, "c_text.jpg")):
        with pytest.raises(RuntimeError) as e:
            ds[i]
        assert str(tmp_path / name) in str(e.value)

    ds = build_dataset("folder", str(tmp_path), "train", on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        img, _ = ds[1]
    assert np.asarray(img)[0, 0].tolist() == [1, 2, 3]  # next valid sample: d_good.png
    assert "b_truncated.png" in caplog.text and "c_text.jpg" in caplog.text


def test_folder_all_corrupt_and_empty(tmp_path):
    (tmp_path / "bad" / "x.png").parent.mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    ds = build_dataset("folder", str(tmp_path / "bad"), "train", on_corrupt="skip")
    with pytest.raises(RuntimeError, match="unreadable"):
        ds[0]

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value) and ".webp" in str(e.value)


# ----------------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_shapes():
    a = build_dataset("synthetic", None, "train", synthetic_size=40, img_size=16, seed=3)
    b = build_dataset("synthetic", None, "train", synthetic_size=40, img_size=16, seed=3)
    img, label = a[17]
    assert img.mode == "RGB" and img.size == (16, 16) and 0 <= label < 10
    assert a.num_classes == 10 and a.in_chans == 3 and len(a) == 40
    assert np.array_equal(np.asarray(b[17][0]), np.asarray(img))  # no need to generate 0..16
    other_seed = build_dataset("synthetic", None, "train", synthetic_size=40, img_size=16, seed=4)
    test = build_dataset("synthetic", None, "test", synthetic_size=40, img_size=16, seed=3)
    assert not np.array_equal(np.asarray(other_seed[17][0]), np.asarray(img))
    assert not np.array_equal(np.asarray(test[17][0]), np.asarray(img))
    gray = build_dataset("synthetic", None, "train", in_chans=1, img_size=8)
    assert gray[0][0].mode == "L" and gray.in_chans == 1
    with pytest.raises(IndexError):
        a[40]


def test_synthetic_is_learnable():
    kw = dict(img_size=16, in_chans=3, seed=0)
    train = build_dataset("synthetic", None, "train", synthetic_size=200, **kw)
    test = build_dataset("synthetic", None, "test", synthetic_size=100, **kw)

    def arrays(ds):
        xs, ys = zip(*((np.asarray(im, np.float32).ravel(), y) for im, y in ds), strict=True)
        return np.stack(xs), np.array(ys)

    x, y = arrays(train)
    xt, yt = arrays(test)
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])
    pred = ((xt[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() > 0.8


# ---------------------------------------------------------------------------------------- misc


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="fashion_mnist") as e:
        build_dataset("fashionmnist", None, "train")
    assert "Did you mean 'fashion_mnist'" in str(e.value) and "cifar100" in str(e.value)
    assert len(build_dataset("Synthetic", None, "val")) == 512  # case-insensitive; val == test
    with pytest.raises(ValueError, match="split"):
        build_dataset("synthetic", None, "dev")


def test_dataset_stats():
    assert dataset_stats("fashion_mnist") == ((0.2860,), (0.3530,))
    assert dataset_stats("mnist") == ((0.1307,), (0.3081,))
    assert dataset_stats("cifar10")[0] == (0.4914, 0.4822, 0.4465)
    assert dataset_stats("cifar100")[1] == (0.2673, 0.2564, 0.2762)
    assert dataset_stats("folder") == dataset_stats("synthetic")
    assert dataset_stats("synthetic")[0] == (0.485, 0.456, 0.406)
    assert dataset_stats("fashion_mnist", in_chans=3)[0] == (0.2860,) * 3
    assert dataset_stats("cifar10", in_chans=1)[0] == pytest.approx(
        ((0.4914 + 0.4822 + 0.4465) / 3,)
    )
