"""`mimkit data fetch`: local copies and Debian's package, no network."""

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mimkit.cli import main
from mimkit.data import build_dataset
from mimkit.data.fetch import IDX_FILES, fetch


def make_idx_folder(folder: Path, n_train: int = 12, n_test: int = 5) -> None:
    """Four uncompressed uint8 IDX files (28x28 images, labels 0..9)."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            header = bytes([0, 0, 0x08, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
            data = np.arange(np.prod(shape)) % (10 if kind.startswith("labels") else 256)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + data.astype(np.uint8).tobytes())


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))


def gzip_folder(folder: Path) -> Path:
    make_idx_folder(folder)
    for f in list(folder.iterdir()):
        f.with_name(f.name + ".gz").write_bytes(gzip.compress(f.read_bytes()))
        f.unlink()
    return folder


def test_fetch_lays_out_a_local_copy(tmp_path, capsys):
    gzip_folder(tmp_path / "dl" / "fashion-mnist")
    assert main(["data", "fetch", "fashion_mnist", "--root", str(tmp_path / "dl")]) == 0
    assert "ready in" in capsys.readouterr().out
    raw = tmp_path / "dl" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)
    assert len(build_dataset("fashion_mnist", str(tmp_path / "dl"), "test")) == 5


def test_fetch_without_any_source_is_one_line(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("mimkit.data.fetch._torchvision_download", offline)
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))  # no apt-get
    assert main(["data", "fetch", "mnist", "--root", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("mimkit: error:")]  # besides progress log lines
    assert len(errors) == 1 and errors[0] == err[-1]
    assert "could not fetch mnist" in err[-1] and "network unreachable" in err[-1]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None, reason="needs dpkg-deb")
def test_fetch_from_the_debian_package(tmp_path, monkeypatch):
    # A .deb with the layout of dataset-fashion-mnist, served by a stand-in `apt-get download`.
    pkg = tmp_path / "pkg"
    gzip_folder(pkg / "usr" / "share" / "datasets" / "fashion-mnist")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n")
    deb = tmp_path / "dataset-fashion-mnist_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = download ] && cp {deb} . \n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("mimkit.data.fetch._torchvision_download", offline)
    folder = fetch("fashion_mnist", tmp_path / "root")
    assert len(build_dataset("fashion_mnist", str(folder), "train")) == 12
