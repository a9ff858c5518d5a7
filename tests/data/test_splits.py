"""The train/val rule is a contract other modules rely on: pinned here."""

import pytest
import torch

from mimkit.config import load_config
from mimkit.data import build_dataset, dataset_from_config, split_indices
from mimkit.data.build import val_fraction
from mimkit.errors import DataError


@pytest.mark.parametrize("n,fraction,seed", [(120, 0.1, 0), (57, 0.25, 3), (10, 0.0, 0), (60000, 0.1, 0)])
def test_split_rule_is_pinned(n, fraction, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = round(n * fraction)
    train, val = split_indices(n, fraction, seed)
    assert val == sorted(perm[:k].tolist()) and train == sorted(perm[k:].tolist())
    assert sorted(train + val) == list(range(n))


def test_split_rule_first_values():
    # Literal values, so a change of torch's randperm or of the rule shows up here.
    train, val = split_indices(20, 0.2, 0)
    assert val == sorted(torch.randperm(20, generator=torch.Generator().manual_seed(0))[:4].tolist())
    assert len(val) == 4 and len(train) == 16


def test_train_val_test_from_config():
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_size=50", "data.val_fraction=0.2",
                             "data.split_seed=1", "model.arch=vit_tiny_small_images", "model.img_size=16"])
    train, val, test = (dataset_from_config(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (40, 10, 50)
    assert set(train.indices).isdisjoint(val.indices)
    assert val.indices == split_indices(50, 0.2, 1)[1]
    assert train.labels.tolist() == [i % 10 for i in train.indices]


def test_default_val_fraction_depends_on_a_test_split(tmp_path):
    from PIL import Image

    for sub in ("flat", "split/train", "split/test"):
        (tmp_path / sub).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / sub / f"{i}.png")
    base = ["data.name=folder", "model.arch=vit_tiny_small_images", "model.img_size=16"]
    flat = load_config(None, [*base, f"data.root={tmp_path / 'flat'}"])
    split = load_config(None, [*base, f"data.root={tmp_path / 'split'}"])
    assert val_fraction(flat) == 0.1 and val_fraction(split) == 0.0
    assert len(dataset_from_config(flat, "train")) == 9
    # no test split: "test" is the held-out val split, never training images
    assert dataset_from_config(flat, "test").indices == dataset_from_config(flat, "val").indices
    assert len(dataset_from_config(split, "test")) == 10
    with pytest.raises(DataError, match="no test split and data.val_fraction is 0"):
        build_dataset("folder", str(tmp_path / "flat"), "test", val_fraction=0.0)
    assert load_config("fmnist_tiny").data.val_fraction == 0.1
