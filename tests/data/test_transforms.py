import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mimkit.data import (
    SeededDataset,
    build_dataset,
    dataset_stats,
    eval_transform,
    pretrain_transform,
)
from mimkit.data.transforms import ToNormalizedTensor, WholeImage, whole_image_box

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def noise_image(mode: str, size=(40, 30), seed=0) -> Image.Image:
    chans = 3 if mode == "RGB" else 1
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], chans), np.uint8)
    return Image.fromarray(arr if chans == 3 else arr[..., 0])


@pytest.mark.parametrize(("mode", "in_chans"), [("L", 3), ("RGB", 3), ("RGB", 1), ("L", 1)])
def test_output_shape_and_dtype(mode, in_chans):
    img = noise_image(mode)
    mean, std = dataset_stats("fashion_mnist" if in_chans == 1 else "cifar10")
    for tf in (
        pretrain_transform(32, mean, std, in_chans),
        eval_transform(32, mean, std, in_chans),
    ):
        out = tf(img)
        assert out.shape == (in_chans, 32, 32) and out.dtype == torch.float32


def test_normalization_matches_mean_std():
    img = Image.new("RGB", (20, 20), (51, 102, 204))
    out = eval_transform(16, MEAN, STD, 3)(img)
    expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out, expected[:, None, None].expand(3, 16, 16), atol=1e-5)
    # one-channel statistics are broadcast when converting gray to RGB
    gray = eval_transform(16, (0.5,), (0.5,), 3)(Image.new("L", (20, 20), 255))
    assert gray.shape == (3, 16, 16) and torch.allclose(gray, torch.ones_like(gray))
    # and 3-channel images become one-channel with averaged statistics
    one = eval_transform(16, MEAN, STD, 1)(Image.new("RGB", (20, 20), (0, 0, 0)))
    assert torch.allclose(one, torch.full_like(one, -0.4 / (0.95 / 3)), atol=1e-5)


def test_eval_transform_recipes():
    big = eval_transform(224, MEAN, STD, 3)
    sizes = [t.size for t in big.transforms if isinstance(t, (T.Resize, T.CenterCrop))]
    assert sizes == [256, (224, 224)]
    assert big(noise_image("RGB", size=(400, 300))).shape == (3, 224, 224)
    small = eval_transform(32, MEAN, STD, 3)
    assert not any(isinstance(t, T.CenterCrop) for t in small.transforms)
    assert small(noise_image("RGB", size=(50, 20))).shape == (3, 32, 32)  # squashed, not cropped
    cropped = eval_transform(32, MEAN, STD, 3, crop_pct=0.8)
    assert [t.size for t in cropped.transforms if isinstance(t, T.Resize)] == [40]


def test_pretrain_transform_is_random_and_flip_optional():
    img = noise_image("RGB", size=(64, 64))
    tf = pretrain_transform(32, MEAN, STD, 3)
    torch.manual_seed(0)
    assert not torch.equal(tf(img), tf(img))
    rrc = next(t for t in tf.transforms if isinstance(t, T.RandomResizedCrop))
    assert rrc.scale == (0.2, 1.0) and rrc.interpolation == T.InterpolationMode.BICUBIC
    no_flip = pretrain_transform(32, MEAN, STD, 3, hflip=False, scale=(0.5, 1.0))
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in no_flip.transforms)


def seeded_synthetic(seed: int = 7) -> SeededDataset:
    tf = pretrain_transform(16, *dataset_stats("synthetic"), 3)
    return SeededDataset(build_dataset("synthetic", None, "train", tf, synthetic_size=8), seed)


def test_seeded_dataset_deterministic():
    ds = seeded_synthetic()
    first, label = ds[3]
    torch.rand(100), random.random(), np.random.rand(3)  # consume global RNG in between
    again, label2 = ds[3]
    assert torch.equal(first, again) and label == label2
    assert torch.equal(seeded_synthetic()[3][0], first)  # a fresh wrapper agrees
    assert not torch.equal(ds[4][0], first)
    assert not torch.equal(seeded_synthetic(seed=8)[3][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], first)  # different epoch, different crop
    ds.set_epoch(0)
    assert torch.equal(ds[3][0], first) and torch.equal(ds[-5][0], first)
    assert ds.num_classes == 10 and ds.in_chans == 3 and len(ds) == 8  # attributes forwarded


def test_seeded_dataset_restores_global_rng():
    ds = seeded_synthetic()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    ds[2]
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_seeded_dataset_independent_of_workers():
    """Workers seed the generators per sample without restoring them (nothing else reads them
    there); the samples are the main process's to the bit."""
    ds = seeded_synthetic()
    ds.set_epoch(2)
    serial = torch.cat([x for x, _ in DataLoader(ds, batch_size=3)])
    parallel = torch.cat([x for x, _ in DataLoader(ds, batch_size=3, num_workers=2)])
    assert torch.equal(serial, parallel)


@pytest.mark.parametrize(("mode", "chans"), [("L", 1), ("RGB", 3)])
def test_to_normalized_tensor_is_to_tensor_then_normalize_to_the_bit(mode, chans):
    img = noise_image(mode, size=(23, 17))
    ref = T.Normalize(MEAN[:chans], STD[:chans])(T.ToTensor()(img))
    out = ToNormalizedTensor(MEAN[:chans], STD[:chans], chans)(img)
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, ref)


@pytest.mark.parametrize("size", [(28, 28), (30, 20), (17, 30), (300, 100), (48, 64)])
def test_whole_image_is_random_resized_crops_fallback(size):
    """crop_scale [1, 1]: get_params' fallback box (the whole image at its ratio clamped to
    [3/4, 4/3], centred), the same pixels as RandomResizedCrop when it takes that box, no draw."""
    img = noise_image("L", size=size)
    torch.manual_seed(0)
    fallback = T.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(1, img.height, img.width),
                                              [1e-9, 1e-9], [3 / 4, 4 / 3])  # no try fits
    assert whole_image_box(img.height, img.width) == tuple(fallback)
    rrc = T.RandomResizedCrop(32, scale=(1.0, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    if size[0] == size[1]:  # square: every try that fits takes the whole image too
        assert np.array_equal(np.asarray(WholeImage(32)(img)), np.asarray(rrc(img)))
    tf = pretrain_transform(32, MEAN[:1], STD[:1], 1, scale=(1.0, 1.0))
    assert not any(isinstance(t, T.RandomResizedCrop) for t in tf.transforms)
    torch.manual_seed(1)
    out = tf(img)
    after = torch.rand(1)
    torch.manual_seed(1)
    flip = torch.rand(1) < 0.5  # the flip is the transform's only draw
    assert torch.equal(torch.rand(1), after)
    expect = ToNormalizedTensor(MEAN[:1], STD[:1], 1)(WholeImage(32)(img))
    assert torch.equal(out, expect.flip(-1) if flip else expect)
