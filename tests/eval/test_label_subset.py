import numpy as np
import pytest

from mimkit.eval.common import class_balanced_indices, dataset_labels, labelled_dataset


def test_class_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(1).shuffle(labels)
    idx = class_balanced_indices(labels, 0.1, seed=3)
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.tolist() == [10] * 10
    assert len(set(idx)) == len(idx) == 100 and idx == sorted(idx)
    assert idx == class_balanced_indices(labels, 0.1, seed=3)
    assert idx != class_balanced_indices(labels, 0.1, seed=4)
    assert np.bincount(labels[class_balanced_indices(labels, 0.01, 0)]).tolist() == [1] * 10
    assert class_balanced_indices(labels, 1.0) == list(range(1000))


def test_small_classes_are_capped_not_oversampled():
    labels = np.array([0] * 90 + [1] * 5 + [2] * 5)
    idx = class_balanced_indices(labels, 0.3, seed=0)  # 10 per class wanted
    assert np.bincount(labels[idx]).tolist() == [10, 5, 5]


def test_bad_fraction():
    with pytest.raises(ValueError, match="label fraction"):
        class_balanced_indices(np.zeros(5), 0.0)


def test_labelled_dataset_fraction(tiny_cfg):
    full = labelled_dataset(tiny_cfg, "train")
    assert dataset_labels(full).tolist() == [full[i][1] for i in range(len(full))]
    sub = labelled_dataset(tiny_cfg, "train", label_fraction=0.25)
    labels = dataset_labels(sub)
    assert len(sub) == 30 and np.bincount(labels).tolist() == [3] * 10
    assert [sub[i][1] for i in range(len(sub))] == labels.tolist()
