import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.data import ImageFolderDataset, build_dataset
from mimkit.data import shards as S
from mimkit.errors import DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))


def make_folder(root: Path) -> Path:
    """7 small images in 4 class folders (names with dots, a nested folder, two formats)."""
    rng = np.random.default_rng(0)
    names = ["cat/a.png", "cat/b.v2.png", "cat-2/z.png", "dog/deep/x.png", "dog/y.jpg", "emu/k.png", "emu/l.png"]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(6 + len(name) % 3, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
    return root


def shard_dir(tmp_path: Path, max_count: int = 3) -> tuple[Path, Path]:
    images = make_folder(tmp_path / "images")
    out = tmp_path / "shards"
    S.write_shards(images, out, max_count=max_count)
    return images, out


def test_folder_and_shards_give_same_samples(tmp_path):
    images, out = shard_dir(tmp_path)
    folder = ImageFolderDataset(images)
    shards = build_dataset("shards", str(out), "train")
    assert isinstance(shards.base, S.ShardDataset)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    index = json.loads((out / "index.json").read_text())
    assert index["wids_version"] == 1 and [s["nsamples"] for s in index["shardlist"]] == [3, 3, 1]
    assert len(shards) == len(folder) == 7
    assert shards.classes == folder.classes == ["cat", "cat-2", "dog", "emu"] and shards.num_classes == 4
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["00000000_cat_a.cls", "00000000_cat_a.png"]  # WebDataset layout
    for i in range(len(folder)):
        (a, la), (b, lb) = folder[i], shards[i]
        assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))
    assert shards.labels.tolist() == folder.labels.tolist()


def test_shards_are_reproducible_and_pickle_into_workers(tmp_path):
    images, out = shard_dir(tmp_path)
    first = (out / "shard-000001.tar").read_bytes()
    S.write_shards(images, out, max_count=3)
    assert (out / "shard-000001.tar").read_bytes() == first
    ds = build_dataset("shards", str(out), "train", transform=lambda im: int(np.asarray(im, dtype=np.int64).sum()))
    ds[0]  # open the reader in this process first
    serial = [x.tolist() for x, _ in DataLoader(ds, batch_size=2)]
    parallel = [x.tolist() for x, _ in DataLoader(ds, batch_size=2, num_workers=2)]
    assert serial == parallel


def test_index_without_labels_from_another_tool(tmp_path):
    _, out = shard_dir(tmp_path)
    index = json.loads((out / "index.json").read_text())
    for shard in index["shardlist"]:
        del shard["labels"]
    del index["classes"]
    (out / "index.json").write_text(json.dumps(index))
    ds = build_dataset("shards", str(out), "train")
    assert ds.labels.tolist() == [0, 0, 1, 2, 2, 3, 3] and ds.num_classes == 4


def test_streaming_and_unindexed_shards_are_refused(tmp_path, capsys):
    _, out = shard_dir(tmp_path)
    for root in ("pipe:cat shards/shard-000000.tar", "https://x.org/s-{000..009}.tar", str(out / "shard-000000.tar")):
        with pytest.raises(DataError, match="cannot stream them; copy the shards to a local folder"):
            build_dataset("shards", root, "train")
    (out / "index.json").unlink()
    with pytest.raises(DataError, match="no index.json in .*widsindex create"):
        build_dataset("shards", str(out), "train")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "data.name=shards", "data.root=pipe:cat x.tar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimkit: error: data.root=pipe:cat x.tar") and "\n" not in err


def test_corrupt_sample_in_a_shard(tmp_path):
    images = make_folder(tmp_path / "images")
    (images / "cat" / "b.v2.png").write_bytes(b"not a png")
    out = tmp_path / "shards"
    S.write_shards(images, out, max_count=10)
    with pytest.raises(DataError, match="00000001_cat_b_v2.png.*data.on_corrupt=skip"):
        build_dataset("shards", str(out), "train")[1]
    skipping = build_dataset("shards", str(out), "train", on_corrupt="skip")
    assert skipping[1][1] == 1  # the next readable sample, cat-2/z.png


def test_make_shards_cli_and_split_folders(tmp_path, capsys):
    images = make_folder(tmp_path / "images")
    assert main(["make-shards", "--images", str(images), "--out", str(tmp_path / "sh" / "train"),
                 "--max-count", "5"]) == 0
    assert "7 samples (4 classes) to 2 shards" in capsys.readouterr().out
    S.write_shards(images, tmp_path / "sh" / "test", max_count=3)
    assert len(build_dataset("shards", str(tmp_path / "sh"), "train")) == 7
    assert len(build_dataset("shards", str(tmp_path / "sh"), "test").base.shards) == 3
    assert main(["make-shards", "--images", str(images), "--out", str(tmp_path / "x-%06d.tar")]) == 2
    assert "give a folder" in capsys.readouterr().err


def test_pretrain_reads_shards_and_resumes_exactly(tmp_path, tiny_overrides):
    from mimkit.config import load_config
    from mimkit.engine.logging import read_metrics
    from mimkit.engine.trainer import pretrain

    _, out = shard_dir(tmp_path, max_count=4)
    over = [o for o in tiny_overrides if not o.startswith("data.")] + [
        "data.name=shards", f"data.root={out}", "data.num_workers=0",
        "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2", "model.img_size=16",
    ]
    full = read_metrics(pretrain(load_config(None, over), tmp_path / "full"))
    pretrain(load_config(None, [*over, "train.max_steps=2"]), tmp_path / "half")
    resumed = read_metrics(pretrain(None, tmp_path / "half", resume=True, overrides=["train.max_steps=4"]))
    assert [r["step"] for r in full] == [1, 2, 3, 4]  # 6 training images (1 held out as val), 3 steps/epoch
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
