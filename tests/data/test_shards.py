import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.data import ImageFolderDataset, build_dataset
from mimkit.data import shards as S


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))


def make_folder(root: Path, labeled: bool = True) -> Path:
    """7 small images in 3 class folders (names with dots, a nested folder, two formats)."""
    rng = np.random.default_rng(0)
    names = ["cat/a.png", "cat/b.v2.png", "cat-2/z.png", "dog/deep/x.png", "dog/y.jpg", "emu/k.png", "emu/l.png"]
    for name in names:
        path = root / (name if labeled else name.replace("/", "_"))
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(6 + len(name) % 3, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=95)
    return root


def shard_dir(tmp_path: Path, max_count: int = 3, labeled: bool = True) -> tuple[Path, Path]:
    images = make_folder(tmp_path / "images", labeled)
    out = tmp_path / "shards"
    S.write_shards(images, str(out / "shard-%06d.tar"), max_count=max_count)
    return images, out


def as_array(img):
    return np.asarray(img)


def test_expand_braces():
    assert S.expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert S.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert S.expand_braces("plain.tar") == ["plain.tar"]
    assert S.split_member_name("d/k.seg.png") == ("d/k", "seg.png")


def test_folder_and_shards_give_same_samples(tmp_path):
    images, out = shard_dir(tmp_path)
    folder = ImageFolderDataset(images)
    shards = build_dataset("shards", str(out), "train")
    assert isinstance(shards, S.ShardDataset)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(shards) == len(folder) == 7
    assert shards.classes == folder.classes == ["cat", "cat-2", "dog", "emu"] and shards.num_classes == 4
    keys = [s.key for s in shards.samples]
    assert keys == sorted(keys) and all("." not in k for k in keys)
    for i in range(len(folder)):
        (a, la), (b, lb) = folder[i], shards[i]
        assert la == lb and np.array_equal(as_array(a), as_array(b))  # bytes copied unchanged
    assert shards.targets == [label for _, label in folder.samples]
    # a brace pattern and a comma list name the same samples
    braced = build_dataset("shards", str(out / "shard-{000000..000002}.tar"), "train")
    listed = S.ShardDataset(",".join(str(p) for p in sorted(out.glob("*.tar"))))
    assert [s.key for s in braced.samples] == [s.key for s in listed.samples] == keys


def test_writing_is_deterministic_and_unlabeled_has_no_cls(tmp_path):
    images = make_folder(tmp_path / "images", labeled=False)
    for run in ("a", "b"):
        S.write_shards(images, str(tmp_path / run / "s-%03d.tar"), max_count=4)
    for name in ("s-000.tar", "s-001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ds = S.ShardDataset(tmp_path / "a", in_chans=1)
    assert ds.num_classes == 0 and {label for _, label in (ds[i] for i in range(len(ds)))} == {-1}
    assert ds[0][0].mode == "L"
    with tarfile.open(tmp_path / "a" / "s-000.tar") as tar:
        assert not any(n.endswith(".cls") for n in tar.getnames())


def test_index_is_cached(tmp_path, monkeypatch):
    _, out = shard_dir(tmp_path)
    first = [s.key for s in S.ShardDataset(out).samples]

    def boom(path):
        raise AssertionError("index_shard called although cached")

    monkeypatch.setattr(S, "index_shard", boom)
    assert [s.key for s in S.ShardDataset(out).samples] == first


def all_keys(ds: S.IterableShardDataset, readers: int) -> list[list[str]]:
    return [[key for _, key, _ in ds.raw_samples(r, readers)] for r in range(readers)]


@pytest.mark.parametrize("readers", [1, 2, 3, 5])
def test_rank_worker_split_covers_every_sample_once(tmp_path, readers):
    _, out = shard_dir(tmp_path, max_count=2)  # 4 shards: both shard- and sample-splitting occur
    expected = [s.key for s in S.ShardDataset(out).samples]
    ds = S.IterableShardDataset(str(out), shuffle=4, seed=3)
    ds.set_epoch(1)
    parts = all_keys(ds, readers)
    got = [k for part in parts for k in part]
    assert sorted(got) == sorted(expected) and len(got) == len(expected)
    if readers > 1:
        assert all(parts)  # everybody gets work


def test_dataloader_workers_and_seeded_shuffle(tmp_path):
    _, out = shard_dir(tmp_path, max_count=2)
    reference = S.ShardDataset(out)
    by_key = {s.key: reference.targets[i] for i, s in enumerate(reference.samples)}

    def labels(workers: int, seed: int) -> list[int]:
        ds = S.IterableShardDataset(str(out), transform=lambda im: np.asarray(im).shape, shuffle=3, seed=seed)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        return [int(label) for _, label in loader]

    two = labels(2, seed=0)
    assert sorted(two) == sorted(by_key.values())
    assert labels(2, seed=0) == two  # same seed, same order
    one = labels(0, seed=0)
    assert sorted(one) == sorted(two)


def test_pipe_stream_matches_map_style(tmp_path):
    _, out = shard_dir(tmp_path)
    mapped = S.ShardDataset(out)
    sources = ",".join(f"pipe:cat {p}" for p in sorted(out.glob("*.tar")))
    streamed = build_dataset("shards", sources, "train")
    assert isinstance(streamed, S.IterableShardDataset)
    got = list(streamed)
    assert len(got) == len(mapped)
    for (a, la), i in zip(got, range(len(mapped)), strict=True):
        b, lb = mapped[i]
        assert la == lb and np.array_equal(as_array(a), as_array(b))
    failing = S.IterableShardDataset("pipe:exit 3")
    with pytest.raises((OSError, ValueError), match="pipe:exit 3"):
        list(failing)


def corrupt_first_image(shard: Path) -> str:
    """Overwrite the first image's bytes in place (tar structure intact); return its member name."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if not m.name.endswith(".cls"))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
    shard.write_bytes(bytes(raw))
    return member.name


def test_corrupt_member_names_shard_and_member(tmp_path, caplog):
    _, out = shard_dir(tmp_path)
    shard = out / "shard-000001.tar"
    name = corrupt_first_image(shard)
    key = name.split(".")[0]
    ds = S.ShardDataset(out)
    index = next(i for i, s in enumerate(ds.samples) if s.key == key)
    with pytest.raises(RuntimeError) as e:
        ds[index]
    assert str(shard) in str(e.value) and name in str(e.value)
    skipping = S.ShardDataset(out, on_corrupt="skip")
    img, label = skipping[index]  # the next valid sample instead
    assert label == skipping.targets[index + 1]
    assert key in caplog.text
    with pytest.raises(RuntimeError) as e:
        list(S.IterableShardDataset(str(out)))
    assert str(shard) in str(e.value) and key in str(e.value)


def test_truncated_shard_names_it(tmp_path):
    _, out = shard_dir(tmp_path)
    shard = out / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(ValueError, match="shard-000000.tar"):
        S.ShardDataset(out)


def test_make_shards_cli(tmp_path, capsys):
    images = make_folder(tmp_path / "images")
    pattern = str(tmp_path / "out" / "s-%04d.tar")
    assert main(["make-shards", "--images", str(images), "--out", pattern, "--max-count", "5"]) == 0
    assert "7 samples (4 classes) to 2 shards" in capsys.readouterr().out
    assert len(build_dataset("shards", str(tmp_path / "out"), "train")) == 7
    with pytest.raises(SystemExit, match="%d-style"):
        main(["make-shards", "--images", str(images), "--out", str(tmp_path / "x.tar")])


def test_pretrain_reads_shards(tmp_path, tiny_overrides):
    from mimkit.config import load_config
    from mimkit.engine.logging import read_metrics
    from mimkit.engine.trainer import pretrain

    _, out = shard_dir(tmp_path, max_count=4)
    over = [o for o in tiny_overrides if not o.startswith("data.")] + [
        "data.name=shards", f"data.root={out}", "data.num_workers=0", "train.batch_size=2",
        "train.max_steps=2", "model.img_size=16",
    ]
    run = pretrain(load_config(None, over), tmp_path / "run")
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_train_and_test_split_folders(tmp_path):
    images = make_folder(tmp_path / "images")
    S.write_shards(images, str(tmp_path / "sh" / "train" / "s-%03d.tar"), max_count=10)
    S.write_shards(images, str(tmp_path / "sh" / "test" / "s-%03d.tar"), max_count=3)
    assert len(S.ShardDataset(tmp_path / "sh", "train").shards) == 1
    assert len(S.ShardDataset(tmp_path / "sh", "val").shards) == 3  # val = test
