"""The folder quick start and the data layer's user errors, through the CLI (one line, exit 2)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mimkit.cli import main

SMALL = ["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
         "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
         "data.num_workers=0", "train.epochs=1", "train.warmup_epochs=0"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))


def photo_folder(root: Path, n: int = 30, classes: tuple[str, ...] = ()) -> Path:
    """RGB photos of mixed sizes and formats (JPEG, PNG, WebP, one RGBA, one gray), one corrupt
    JPEG, and a text file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        if i == 1:
            img = img.convert("RGBA")
        if i == 2:
            img = img.convert("L")
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        if fmt == "JPEG" and img.mode == "RGBA":
            fmt, ext = "PNG", "png"
        img.save(folder / f"img{i:03d}.{ext}", format=fmt)
    (root / (classes[0] if classes else "") / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "README.txt").write_text("my photos")
    return root


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("mimkit: error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_folder_quick_start(tmp_path, caplog):
    photos = photo_folder(tmp_path / "photos")
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mimkit"):
        assert main(["pretrain", "--config", "folder", "--out", str(run), f"data.root={photos}", *SMALL]) == 0
    text = caplog.text
    assert "28 training images (10% held out as val" in text and "unlabeled" in text  # 31 images, 1 broken
    assert "skipped: 1 files that are not images (.txt x1)" in text
    assert "3 channels (RGB)" in text and "data.stats=compute" in text and "estimated time" in text
    assert "batch 64 x accum 1 -> batch 2 x accum 1" in text  # 28 // 10: an epoch has >= 10 steps
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["in_chans"] == 3 and saved["train"]["batch_size"] == 2
    assert len(saved["data"]["mean"]) == 3 and all(0.3 < m < 0.7 for m in saved["data"]["mean"])
    assert sorted(p.name for p in run.glob("checkpoint-*.pt")) == ["checkpoint-00000014.pt"]
    # resume keeps the computed statistics and the fitted batch: nothing is recomputed
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mimkit"):
        assert main(["pretrain", "--out", str(run), "--resume", "train.epochs=2"]) == 0
    assert "data.stats=compute:" not in caplog.text and "optimizer steps (data.min" not in caplog.text
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["mean"] == saved["data"]["mean"]


def test_grayscale_only_when_asked(tmp_path):
    photos = photo_folder(tmp_path / "photos", n=12)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "folder", "--out", str(run), f"data.root={photos}", *SMALL,
                 "model.in_chans=1", "data.stats=imagenet", "data.on_corrupt=skip"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["in_chans"] == 1 and saved["data"]["mean"] is None


def test_imagenet_preset_on_a_small_folder_fits_the_batch(tmp_path, capsys):
    photos = photo_folder(tmp_path / "photos", n=40)
    over = [o for o in SMALL if not o.startswith("model.patch")] + ["model.arch=vit_tiny_small_images",
                                                                    "data.on_corrupt=skip", "train.max_steps=1"]
    assert main(["pretrain", "--config", "mae_vit_base_patch16", "--out", str(tmp_path / "run"),
                 f"data.root={photos}", *over]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["train"]["batch_size"], saved["train"]["accum_iter"]) == (37, 1)  # 41 - 4 val: 64 x 8 -> 37 x 1


def test_wrong_data_root(tmp_path, capsys):
    assert main(["pretrain", "--config", "folder", "--out", str(tmp_path / "r"), f"data.root={tmp_path / 'nope'}"]) == 2
    line = error_line(capsys)
    assert "nope does not exist; expected a folder of images" in line
    assert main(["pretrain", "--out", str(tmp_path / "r"), f"data.root={tmp_path}"]) == 2  # fmnist_tiny default
    assert "mimkit data fetch fashion_mnist --root" in error_line(capsys)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_in_training_is_one_line(tmp_path, capsys, workers):
    photos = photo_folder(tmp_path / "photos", n=8)
    for p in photos.glob("img*"):
        p.write_bytes(b"junk")
    assert main(["pretrain", "--config", "folder", "--out", str(tmp_path / "r"), f"data.root={photos}", *SMALL,
                 "data.on_corrupt=error", "data.stats=imagenet", f"data.num_workers={workers}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("mimkit: error:") == 1 and "Traceback" not in err  # also from a DataLoader worker
    line = err.split("mimkit: error: ", 1)[1].splitlines()[0]  # after tqdm's \r-updated bar
    assert "cannot read image" in line and line.endswith("remove it, or set data.on_corrupt=skip")


@pytest.fixture
def folder_run(tmp_path):
    """A tiny run pre-trained on a labeled folder with train/ and test/."""
    photo_folder(tmp_path / "labeled" / "train", n=24, classes=("cats", "dogs", "owls"))
    photo_folder(tmp_path / "labeled" / "test", n=9, classes=("cats", "dogs", "owls"))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", "folder", "--out", str(run), f"data.root={tmp_path / 'labeled'}", *SMALL,
                 "train.max_steps=1"]) == 0
    return run


def test_eval_on_unlabeled_folder_and_empty_class(tmp_path, folder_run, capsys):
    ckpt = str(next(folder_run.glob("checkpoint-*.pt")))
    photos = photo_folder(tmp_path / "flat", n=12)
    assert main(["eval", "knn", "--checkpoint", ckpt, f"data.root={photos}"]) == 2
    line = error_line(capsys)
    assert "has no labels" in line and "one sub-folder per class" in line
    # a class whose only training image is held out as val: the label subset has none of it
    lonely = tmp_path / "lonely"
    photo_folder(lonely / "train", n=20, classes=("a", "b"))
    (lonely / "train" / "rare").mkdir()
    Image.new("RGB", (8, 8)).save(lonely / "train" / "rare" / "only.png")
    photo_folder(lonely / "test", n=6, classes=("a", "b", "rare"))
    from mimkit.data import split_indices

    n = 22  # 11 in a/ (one broken), 10 in b/, rare/only.png last
    seed = next(s for s in range(100) if n - 1 in split_indices(n, 0.5, s)[1])
    assert main(["eval", "knn", "--checkpoint", ckpt, f"data.root={lonely}", "data.val_fraction=0.5",
                 "data.label_fraction=0.5", f"data.split_seed={seed}", "data.on_corrupt=skip"]) == 2
    assert "leaves 1 class(es) with no train image (rare)" in error_line(capsys)


def test_eval_reports_its_split(tmp_path, folder_run):
    import json

    ckpt = str(next(folder_run.glob("checkpoint-*.pt")))
    assert main(["eval", "knn", "--checkpoint", ckpt, "--out", str(tmp_path / "e"), "data.val_fraction=0.2",
                 "eval.split=val"]) == 0
    record = json.loads((tmp_path / "e" / "eval_knn_val.json").read_text())
    assert record["split"] == "val" and record["details"]["test_size"] == 5  # 20% of 24 training images


def test_visualize_corrupt_image(tmp_path, folder_run, capsys):
    ckpt = str(next(folder_run.glob("checkpoint-*.pt")))
    photos = photo_folder(tmp_path / "vis", n=3)
    out = tmp_path / "grid.png"
    assert main(["visualize", "--checkpoint", ckpt, "--images", str(photos), "--out", str(out)]) == 2
    assert "broken.jpg" in error_line(capsys)
    assert main(["visualize", "--checkpoint", ckpt, "--images", str(photos), "--out", str(out),
                 "--on-corrupt", "skip"]) == 0
    assert out.is_file()


def test_folder_presets():
    from mimkit.config import load_config

    small, big = load_config("folder"), load_config("folder_vitb16")
    assert (small.model.img_size, small.model.in_chans, small.data.stats) == (64, 3, "compute")
    assert (big.model.arch, big.model.img_size, big.model.in_chans, big.data.stats) == \
        ("vit_base_patch16", 224, 3, "imagenet")
    assert small.data.min_steps_per_epoch == big.data.min_steps_per_epoch == 10
