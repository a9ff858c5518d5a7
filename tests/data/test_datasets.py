import io
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimkit.data import ImageFolderDataset, build_dataset, dataset_stats
from mimkit.errors import DataError

# ------------------------------------------------------------------------------------- helpers

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An uncompressed uint8 IDX file (the format torchvision's MNIST readers parse)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
    return path


def make_idx_folder(folder: Path, n_train: int = 12, n_test: int = 5) -> dict:
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / IDX_FILES[split][0], images)
        write_idx(folder / IDX_FILES[split][1], labels)
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


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------ torchvision data sets


def test_fashion_mnist_through_torchvision(tmp_path):
    data = make_idx_folder(tmp_path / "FashionMNIST" / "raw")
    for split in ("train", "test"):
        ds = build_dataset("fashion_mnist", str(tmp_path), split)
        images, labels = data[split]
        assert len(ds) == len(images) and ds.num_classes == 10 and ds.in_chans == 1
        img, label = ds[3]
        assert isinstance(img, Image.Image) and img.mode == "L" and img.size == (28, 28)
        assert np.array_equal(np.asarray(img), images[3])
        assert type(label) is int and label == labels[3]
        assert ds.labels.tolist() == labels.tolist()
    ds = build_dataset("fashion_mnist", str(tmp_path), "test", transform=lambda im: im.size)
    assert ds[0][0] == (28, 28)


def test_missing_data_set_names_the_fetch_command(tmp_path):
    with pytest.raises(DataError) as e:
        build_dataset("mnist", str(tmp_path / "nowhere"), "train")
    msg = str(e.value)
    assert "\n" not in msg and "mimkit data fetch mnist --root" in msg and "nowhere" in msg
    with pytest.raises(DataError, match="mimkit data fetch cifar10`"):
        build_dataset("cifar10", None, "train")  # default root: the cache


def test_gzip_copy_in_the_cache_is_unpacked_without_network(tmp_path):
    import gzip

    src = tmp_path / "cache" / "fashion-mnist"  # the layout of earlier mimkit caches
    make_idx_folder(src)
    for f in list(src.iterdir()):
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    ds = build_dataset("fashion_mnist", None, "train")
    assert len(ds) == 12 and (tmp_path / "cache" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def write_cifar_batch(path: Path, n: int, label_key: str, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(path, "wb") as f:
        pickle.dump({"data": data, label_key: labels, "batch_label": "x"}, f)
    return data, labels


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)  # fake files: skip the md5
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = [write_cifar_batch(folder / f"data_batch_{i}", 3, "labels", i) for i in range(1, 6)]
    write_cifar_batch(folder / "test_batch", 4, "labels", 9)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"name{i}" for i in range(10)]}, f)
    ds = build_dataset("cifar10", str(tmp_path), "train")
    assert len(ds) == 15 and ds.num_classes == 10 and ds.in_chans == 3 and ds.classes[3] == "name3"
    img, label = ds[4]  # second image of data_batch_2
    data, labels = train[1]
    assert img.mode == "RGB" and img.size == (32, 32) and label == labels[1]
    assert np.asarray(img)[5, 7].tolist() == [data[1, c * 1024 + 5 * 32 + 7] for c in range(3)]
    assert len(build_dataset("cifar10", str(tmp_path), "test")) == 4


def test_corrupt_torchvision_files_are_a_data_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(DataError, match="incomplete or corrupt.*mimkit data fetch cifar10"):
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
    assert ds.labels.tolist() == [0, 1, 1]
    assert [p.name for p, _ in ds.base.samples] == ["z.png", "a.PNG", "b.png"]
    assert [p.name for p in ds.skipped_files] == ["notes.txt"]
    img, label = ds[1]
    assert img.mode == "RGB" and np.asarray(img)[0, 0].tolist() == [0, 0, 255] and label == 1
    gray = build_dataset("folder", str(tmp_path), "train", in_chans=1)
    assert gray[0][0].mode == "L" and gray.in_chans == 1


def test_folder_unlabeled_and_splits(tmp_path):
    write_png(tmp_path / "flat" / "x.png")
    Image.new("RGB", (5, 5)).save(tmp_path / "flat" / "y.BMP", format="BMP")
    write_png(tmp_path / "flat" / "by-date" / "z.png")  # loose images + sub-folders: all, unlabeled
    ds = build_dataset("folder", str(tmp_path / "flat"), "train")
    assert ds.num_classes == 0 and ds[0][1] == -1 and len(ds) == 3

    write_png(tmp_path / "split" / "train" / "a" / "1.png")
    write_png(tmp_path / "split" / "train" / "b" / "2.png")
    write_png(tmp_path / "split" / "val" / "a" / "3.png")  # ImageNet's layout: val/ is the test split
    train = build_dataset("folder", str(tmp_path / "split"), "train")
    test = build_dataset("folder", str(tmp_path / "split"), "test")
    assert len(train) == 2 and len(test) == 1 and test.base.samples[0][0].name == "3.png"


def test_folder_corrupt_images(tmp_path, caplog):
    write_png(tmp_path / "a_good.png")
    (tmp_path / "b_truncated.png").write_bytes(png_bytes(size=(64, 64))[:-40])
    (tmp_path / "c_text.jpg").write_text("this is not a jpeg")
    write_png(tmp_path / "d_good.png", (1, 2, 3))

    ds = build_dataset("folder", str(tmp_path), "train")
    for i, name in ((1, "b_truncated.png"), (2, "c_text.jpg")):
        with pytest.raises(DataError) as e:
            ds[i]
        assert str(tmp_path / name) in str(e.value) and "data.on_corrupt=skip" in str(e.value)

    ds = build_dataset("folder", str(tmp_path), "train", on_corrupt="skip")
    with caplog.at_level(logging.WARNING, logger="mimkit"):
        img, _ = ds[1]
    assert np.asarray(img)[0, 0].tolist() == [1, 2, 3]  # next valid sample: d_good.png
    assert "b_truncated.png" in caplog.text and "c_text.jpg" in caplog.text


def test_skip_stays_inside_the_split(tmp_path):
    """A corrupt training image is replaced by the next *training* image, never a val one."""
    for i in range(10):
        write_png(tmp_path / f"{i}.png", (i, 0, 0))
    train = build_dataset("folder", str(tmp_path), "train", on_corrupt="skip", val_fraction=0.5)
    val_names = {p.name for p, _ in (train.base.samples[j] for j in
                                     build_dataset("folder", str(tmp_path), "val", val_fraction=0.5).indices)}
    (tmp_path / train.base.samples[train.indices[0]][0].name).write_bytes(b"junk")
    img, _ = train[0]
    assert f"{np.asarray(img)[0, 0, 0]}.png" not in val_names


def test_folder_all_corrupt_wrong_root_and_empty(tmp_path):
    (tmp_path / "bad" / "x.png").parent.mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    ds = build_dataset("folder", str(tmp_path / "bad"), "train", on_corrupt="skip")
    with pytest.raises(DataError, match="unreadable"):
        ds[0]

    with pytest.raises(DataError, match="data.root: .*photos does not exist; expected a folder of images"):
        build_dataset("folder", str(tmp_path / "photos"), "train")

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as e:
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


def test_unknown_name_and_split():
    with pytest.raises(DataError, match="fashion_mnist") as e:
        build_dataset("fashionmnist", None, "train")
    assert "Did you mean 'fashion_mnist'" in str(e.value) and "cifar100" in str(e.value)
    assert len(build_dataset("Synthetic", None, "test")) == 512  # case-insensitive
    with pytest.raises(DataError, match="split"):
        build_dataset("synthetic", None, "dev")


def test_dataset_stats():
    assert dataset_stats("fashion_mnist") == ((0.2860,), (0.3530,))
    assert dataset_stats("mnist") == ((0.1307,), (0.3081,))
    assert dataset_stats("cifar10")[0] == (0.4914, 0.4822, 0.4465)
    assert dataset_stats("cifar100")[1] == (0.2673, 0.2564, 0.2762)
    assert dataset_stats("folder") == dataset_stats("synthetic")
