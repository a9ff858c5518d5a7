"""data.decode: pil | torchvision | device draw the same boxes, flips and masks; the device
path's resampling convention; errors; exact resume through the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.data.build import pretrain_dataset
from mimkit.data.datasets import CorruptImageError, EncodedFile
from mimkit.data.decode import DeviceAugment, DeviceBatch, DeviceCrop, TensorCrop, collate_device, crop_box
from mimkit.data.transforms import pretrain_transform
from mimkit.engine.logging import read_metrics
from mimkit.engine.trainer import pretrain

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def smooth_image(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
    """A smooth RGB picture (so resampling kernels agree closely) with an asymmetric layout."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [128 + 100 * np.sin(2 * np.pi * (a * xx + b * yy) + c) for a, b, c in rng.uniform(0.3, 1.5, (3, 3))]
    return Image.fromarray(np.stack(chans, -1).clip(0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str = "JPEG", where: str = "img.jpg") -> EncodedFile:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return EncodedFile(buf.getvalue(), where)


def test_crop_box_draws_what_pretrain_transform_draws():
    img = smooth_image()
    for seed in range(5):
        torch.manual_seed(seed)
        pretrain_transform(24, MEAN, STD, 3)(img)
        after_pil = torch.rand(3)
        torch.manual_seed(seed)
        box = crop_box(60, 80, (0.2, 1.0), True)
        assert torch.equal(torch.rand(3), after_pil)  # same draws, so the masking noise agrees too
        torch.manual_seed(seed)
        from torchvision import transforms as T

        assert box[:4].tolist() == list(T.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]))


def test_torchvision_path_matches_pil_path_up_to_the_decoder_and_kernel():
    img = smooth_image()
    file = encoded(img, "PNG")  # lossless: only the resampling differs
    for seed in range(4):
        torch.manual_seed(seed)
        want = pretrain_transform(24, MEAN, STD, 3)(img)
        torch.manual_seed(seed)
        got = TensorCrop(24, MEAN, STD, 3)(file)
        assert got.shape == want.shape == (3, 24, 24)
        # Both bicubic and antialiased (PIL vs torch kernels): measured 0.002-0.03 grey levels apart.
        assert (got - want).abs().mul(torch.tensor(STD).view(3, 1, 1)).mean() < 0.25 / 255


def test_device_path_on_cpu_matches_the_worker_paths_closely():
    img = smooth_image()
    file = encoded(img, "JPEG")
    aug = DeviceAugment(24, MEAN, STD, 3)
    for seed in range(4):
        torch.manual_seed(seed)
        want = TensorCrop(24, MEAN, STD, 3)(file)
        torch.manual_seed(seed)
        sample = DeviceCrop(3)(file)
        assert sample.jpeg is not None and sample.image is None
        got = aug(DeviceBatch([sample]), torch.device("cpu"))[0]
        # Same box and flip; area-averaged bilinear against bicubic: measured ~0.36 grey levels apart.
        assert (got - want).abs().mul(torch.tensor(STD).view(3, 1, 1)).mean() < 1 / 255


def test_device_resampling_convention_on_a_ramp():
    # A linear ramp is reproduced exactly by bilinear sampling averaged symmetrically over each
    # output pixel: output column j of a crop (left, w) must hold the ramp at left + (j + 0.5) w / S - 0.5.
    h, w, size = 40, 64, 16
    ramp = torch.arange(w, dtype=torch.float32).expand(1, h, w).round().to(torch.uint8)
    aug = DeviceAugment(size, (0.0,), (1 / 255,), 1)  # normalise to the raw 0..255 values
    for top, left, ch, cw, flip in [(0, 0, 40, 64, 0), (5, 10, 20, 32, 0), (3, 7, 8, 9, 1), (0, 20, 40, 40, 1)]:
        box = torch.tensor([top, left, ch, cw, flip])
        out = aug(DeviceBatch([_sample(ramp, box)]), torch.device("cpu"))[0, 0]
        cols = left + (torch.arange(size) + 0.5) * cw / size - 0.5
        want = cols.clamp(0, w - 1)
        if flip:
            want = want.flip(0)
        torch.testing.assert_close(out, want.expand(size, size), atol=1e-4, rtol=0)


def _sample(image: torch.Tensor, box: torch.Tensor):
    from mimkit.data.decode import DeviceSample

    return DeviceSample(box, "ramp", image=image)


def test_device_batch_mixes_jpeg_and_other_formats_and_sizes():
    files = [encoded(smooth_image(60, 80, 0)), encoded(smooth_image(80, 60, 1), "PNG", "b.png"),
             encoded(smooth_image(60, 80, 2)), encoded(smooth_image(33, 47, 3), "BMP", "c.bmp")]
    torch.manual_seed(0)
    samples = [DeviceCrop(3)(f) for f in files]
    assert [s.jpeg is not None for s in samples] == [True, False, True, False]
    items = [((s, torch.rand(4)), i) for i, s in enumerate(samples)]
    (batch, noise), labels = collate_device(items)
    out = DeviceAugment(24, MEAN, STD, 3)(batch, torch.device("cpu"))
    assert out.shape == (4, 3, 24, 24) and noise.shape == (4, 4) and labels.tolist() == [0, 1, 2, 3]
    for i, s in enumerate(samples):  # each image alone gives the same result as in the batch
        alone = DeviceAugment(24, MEAN, STD, 3)(DeviceBatch([s]), torch.device("cpu"))[0]
        torch.testing.assert_close(out[i], alone)


def test_a_truncated_jpeg_is_named():
    good = encoded(smooth_image())
    bad = EncodedFile(good.data[: len(good.data) // 2], "photos/broken.jpg")
    with pytest.raises(CorruptImageError, match="photos/broken.jpg"):
        TensorCrop(24, MEAN, STD, 3)(bad)
    sample = DeviceCrop(3)(bad)  # the header is fine: the device decoder finds it
    with pytest.raises(CorruptImageError, match="photos/broken.jpg.*data.decode=torchvision"):
        DeviceAugment(24, MEAN, STD, 3)(DeviceBatch([DeviceCrop(3)(good), sample]), torch.device("cpu"))
    with pytest.raises(CorruptImageError, match="photos/junk.jpg"):
        DeviceCrop(3)(EncodedFile(b"\xff\xd8\xff not a jpeg", "photos/junk.jpg"))


def _jpeg_folder(root, n: int = 24):
    for i in range(n):
        cls = root / "train" / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        smooth_image(40 + 8 * (i % 3), 48, i).save(cls / f"{i:03d}.jpg", quality=90)
    (root / "test" / "c0").mkdir(parents=True)
    smooth_image(40, 48, 99).save(root / "test" / "c0" / "t.jpg", quality=90)
    return root


FOLDER = ["data.name=folder", "data.stats=imagenet", "data.num_workers=0", "model.arch=vit_tiny_small_images",
          "model.img_size=16", "model.in_chans=3", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
          "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
          "train.batch_size=8", "train.warmup_epochs=1", "train.blr=1e-3", "train.loggers=[]"]


@pytest.mark.parametrize("decode", ["pil", "torchvision", "device"])
def test_all_decoders_crop_the_same_boxes_and_mask_the_same_patches(tmp_path, decode):
    root = _jpeg_folder(tmp_path / "photos")
    cfg = load_config(None, [*FOLDER, f"data.root={root}", f"data.decode={decode}"])
    ds = pretrain_dataset(cfg)
    (item, noise), _ = ds[5]
    pil = pretrain_dataset(load_config(None, [*FOLDER, f"data.root={root}"]))
    (img_pil, noise_pil), _ = pil[5]
    assert torch.equal(noise, noise_pil), decode
    if decode == "device":
        item = DeviceAugment(16, *pil_stats(cfg), 3)(DeviceBatch([item]), torch.device("cpu"))[0]
    assert item.shape == img_pil.shape == (3, 16, 16)
    assert (item - img_pil).abs().mean() < 0.1  # same crop, JPEG + kernel differences only


def pil_stats(cfg):
    from mimkit.data import stats_for

    return stats_for(cfg)


@pytest.mark.parametrize("decode", ["torchvision", "device"])
def test_trainer_resumes_exactly_with_each_decoder(tmp_path, decode):
    root = _jpeg_folder(tmp_path / "photos")
    over = [*FOLDER, f"data.root={root}", f"data.decode={decode}", "train.max_steps=5",
            "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    want = {r["step"]: r["loss"] for r in read_metrics(pretrain(load_config(None, over), tmp_path / "straight"))}
    run = pretrain(load_config(None, [*over, "train.max_steps=3"]), tmp_path / "cut")
    got = {r["step"]: r["loss"] for r in read_metrics(pretrain(None, run, resume=True,
                                                               overrides=["train.max_steps=5"]))}
    assert got == want and len(want) == 5


def test_workers_deliver_device_samples(tmp_path):
    root = _jpeg_folder(tmp_path / "photos")
    over = [*FOLDER, f"data.root={root}", "data.decode=device", "data.num_workers=1", "train.max_steps=2"]
    rows = read_metrics(pretrain(load_config(None, over), tmp_path / "r"))
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("decode", ["torchvision", "device"])
def test_data_sets_held_decoded_augment_the_same_way(decode):
    # Synthetic (like Fashion-MNIST or CIFAR) hands PIL images: same boxes, flips and masks as pil.
    over = ["data.name=synthetic", "data.synthetic_size=16", "model.img_size=16", "model.in_chans=3",
            "data.crop_scale=[0.3,1.0]"]
    pil = pretrain_dataset(load_config(None, over))
    ds = pretrain_dataset(load_config(None, [*over, f"data.decode={decode}"]))
    for i in range(4):
        (want, noise_pil), _ = pil[i]
        (got, noise), _ = ds[i]
        assert torch.equal(noise, noise_pil)
        if decode == "device":
            assert got.image.dtype == torch.uint8 and got.jpeg is None
            got = DeviceAugment(16, *pil_stats(load_config(None, over)), 3)(DeviceBatch([got]), torch.device("cpu"))[0]
        assert got.shape == want.shape and (got - want).abs().mean() < 0.1


def test_a_bad_decode_value_is_one_line(tmp_path, capsys):
    from mimkit.cli import main

    assert main(["pretrain", "--out", str(tmp_path / "r"), "data.name=synthetic", "data.decode=gpu"]) == 2
    assert "data.decode" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_shards_hand_the_same_bytes_as_the_folder(tmp_path):
    from mimkit.data import build_dataset
    from mimkit.data import shards as S
    from mimkit.data.datasets import SeededDataset

    root = _jpeg_folder(tmp_path / "photos", n=6)
    S.write_shards(root / "train", tmp_path / "shards", max_count=4)
    for make in (lambda: TensorCrop(16, MEAN, STD, 3), lambda: DeviceCrop(3)):
        folder = SeededDataset(build_dataset("folder", str(root / "train"), "train", make()), 0)
        shards = SeededDataset(build_dataset("shards", str(tmp_path / "shards"), "train", make()), 0)
        for i in range(6):
            a, b = folder[i][0], shards[i][0]
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:
                assert torch.equal(a.jpeg, b.jpeg) and torch.equal(a.box, b.box)
