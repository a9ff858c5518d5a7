"""data.decode: pil and torchvision draw the same boxes, flips and masks; device draws them per
batch from a per-sample hash (RandomResizedCrop's distribution); the device path's resampling
convention; errors; exact resume through the trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.config import load_config
from mimkit.data.build import pretrain_dataset
from mimkit.data.datasets import CorruptImageError, EncodedFile
from mimkit.data.decode import (
    DeviceAugment,
    DeviceBatch,
    DeviceCrop,
    DeviceDataset,
    TensorCrop,
    batch_crop_boxes,
    batch_uniforms,
    collate_device,
    crop_box,
)
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


def augment(**kw) -> DeviceAugment:
    return DeviceAugment(24, MEAN, STD, 3, num_patches=4, seed=0, **kw)


def test_device_crop_matches_the_worker_paths_closely_for_the_same_box():
    img = smooth_image()
    file = encoded(img, "JPEG")
    for seed in range(4):
        torch.manual_seed(seed)
        want = TensorCrop(24, MEAN, STD, 3)(file)
        torch.manual_seed(seed)
        box = crop_box(60, 80, (0.2, 1.0), True)
        sample = DeviceCrop(3)(file)
        assert sample.jpeg is not None and sample.image is None and (sample.height, sample.width) == (60, 80)
        aug = augment()
        got = aug.crop(aug.decode(DeviceBatch.of([sample]), torch.device("cpu")), box[None], torch.device("cpu"))[0]
        # Area-averaged bilinear against bicubic on a smooth picture: measured ~0.36 grey levels apart.
        assert (got - want).abs().mul(torch.tensor(STD).view(3, 1, 1)).mean() < 1 / 255


def test_batch_uniforms_depend_on_seed_epoch_index_and_draw_only():
    idx = torch.tensor([3, 7, 3, 1000000])
    u = batch_uniforms(0, 2, idx, 50)
    assert u.shape == (4, 50) and u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert torch.equal(u[0], u[2])  # the same sample, wherever it sits in a batch
    assert torch.equal(batch_uniforms(0, 2, idx[1:2], 50)[0], u[1])
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(batch_uniforms(1, 2, idx, 50), u) and not torch.equal(batch_uniforms(0, 3, idx, 50), u)
    assert torch.equal(batch_uniforms(2**40 + 5, 0, idx, 3), batch_uniforms(2**40 + 5, 0, idx, 3))
    big = batch_uniforms(0, 0, torch.arange(20000), 8).flatten()
    assert abs(big.mean().item() - 0.5) < 0.005 and abs(big.var().item() - 1 / 12) < 0.002
    # no visible correlation between neighbouring samples or draws
    grid = batch_uniforms(0, 0, torch.arange(20000), 2)
    assert abs(torch.corrcoef(grid.T)[0, 1].item()) < 0.03
    assert abs(torch.corrcoef(torch.stack([big[:-1], big[1:]]))[0, 1].item()) < 0.03


def test_batch_crop_boxes_follow_random_resized_crop():
    n = 4000
    u = batch_uniforms(0, 0, torch.arange(n), 41)
    h, w = torch.full((n,), 60), torch.full((n,), 80)
    boxes = batch_crop_boxes(u, h, w, (0.2, 1.0), True)
    top, left, ch, cw, flip = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= 60).all() and (left + cw <= 80).all()
    area = (ch * cw).double() / (60 * 80)
    assert area.min() >= 0.19 and area.max() <= 1.0
    ratio = cw.double() / ch.double()
    assert ratio.min() > 0.7 and ratio.max() < 1.45
    assert abs(flip.double().mean().item() - 0.5) < 0.03
    # the same distribution as torchvision's get_params (area and position means)
    from torchvision import transforms as T

    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, 60, 80), [0.2, 1.0], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    ref_area = ref[:, 2] * ref[:, 3] / (60 * 80)
    assert abs(area.mean() - ref_area.mean()) < 0.02 and abs(top.double().mean() - ref[:, 0].mean()) < 1.0
    assert torch.equal(batch_crop_boxes(u, h, w, (0.2, 1.0), False)[:, 4], torch.zeros(n, dtype=torch.int64))
    # scale [1, 1]: no random crop, the whole image (get_params would sometimes take 79 x 60)
    full = batch_crop_boxes(u, h, w, (1.0, 1.0), False)
    assert full[:, :4].tolist() == [[0, 0, 60, 80]] * n
    # tries that never fit fall back to the centred crop at the clamped ratio
    tall = batch_crop_boxes(u[:3], torch.full((3,), 90), torch.full((3,), 30), (1.0, 1.0), False)
    assert tall.tolist() == [[25, 0, 40, 30, 0]] * 3  # ratio 3/4: 40 x 30, centred


def test_device_resampling_convention_on_a_ramp():
    # A linear ramp is reproduced exactly by bilinear sampling averaged symmetrically over each
    # output pixel: output column j of a crop (left, w) must hold the ramp at left + (j + 0.5) w / S - 0.5.
    h, w, size = 40, 64, 16
    ramp = torch.arange(w, dtype=torch.float32).expand(1, h, w).round().to(torch.uint8)
    aug = DeviceAugment(size, (0.0,), (1 / 255,), 1, num_patches=1, seed=0)  # output: raw 0..255 values
    for top, left, ch, cw, flip in [(0, 0, 40, 64, 0), (5, 10, 20, 32, 0), (3, 7, 8, 9, 1), (0, 20, 40, 40, 1)]:
        box = torch.tensor([[top, left, ch, cw, flip]])
        out = aug.crop([ramp], box, torch.device("cpu"))[0, 0]
        cols = left + (torch.arange(size) + 0.5) * cw / size - 0.5
        want = cols.clamp(0, w - 1)
        if flip:
            want = want.flip(0)
        torch.testing.assert_close(out, want.expand(size, size), atol=1e-4, rtol=0)


def test_device_batch_mixes_jpeg_and_other_formats_and_sizes():
    files = [encoded(smooth_image(60, 80, 0)), encoded(smooth_image(80, 60, 1), "PNG", "b.png"),
             encoded(smooth_image(60, 80, 2)), encoded(smooth_image(33, 47, 3), "BMP", "c.bmp")]
    samples = [DeviceCrop(3)(f) for f in files]
    assert [s.jpeg is not None for s in samples] == [True, False, True, False]
    for i, s in enumerate(samples):
        s.index, s.epoch = 10 + i, 1
    (batch, noise), labels = collate_device([(s, i) for i, s in enumerate(samples)])
    assert noise is None and labels.tolist() == [0, 1, 2, 3]
    imgs, noise = augment()(batch, torch.device("cpu"))
    assert imgs.shape == (4, 3, 24, 24) and noise.shape == (4, 4)
    for i, s in enumerate(samples):  # each sample alone gives what it gave in the batch
        alone, alone_noise = augment()(DeviceBatch.of([s]), torch.device("cpu"))
        torch.testing.assert_close(imgs[i], alone[0])
        assert torch.equal(noise[i], alone_noise[0])


def test_a_truncated_jpeg_is_named():
    good = encoded(smooth_image())
    bad = EncodedFile(good.data[: len(good.data) // 2], "photos/broken.jpg")
    with pytest.raises(CorruptImageError, match="photos/broken.jpg"):
        TensorCrop(24, MEAN, STD, 3)(bad)
    samples = [DeviceCrop(3)(good), DeviceCrop(3)(bad)]  # the header is fine: the device decoder finds it
    for i, s in enumerate(samples):
        s.index = i
    with pytest.raises(CorruptImageError, match="photos/broken.jpg.*data.decode=torchvision"):
        augment()(DeviceBatch.of(samples), torch.device("cpu"))
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
def test_each_decoder_gives_a_similar_picture_of_each_sample(tmp_path, decode):
    root = _jpeg_folder(tmp_path / "photos")
    # Without a random crop all paths take the whole image: only decoders and kernels differ.
    over = [*FOLDER, f"data.root={root}", "data.crop_scale=[1.0,1.0]", "data.hflip=false"]
    cfg = load_config(None, [*over, f"data.decode={decode}"])
    ds = pretrain_dataset(cfg)
    (img_pil, noise_pil), _ = pretrain_dataset(load_config(None, over))[5]
    if decode == "device":
        assert isinstance(ds, DeviceDataset)
        (batch, _), _ = collate_device([ds[5]])
        aug = DeviceAugment(16, *pil_stats(cfg), 3, num_patches=16, seed=0, scale=(1.0, 1.0), hflip=False)
        item, noise = aug(batch, torch.device("cpu"))
        item, noise = item[0], noise[0]
    else:
        (item, noise), _ = ds[5]
        assert torch.equal(noise, noise_pil), decode  # same per-sample RNG stream as pil
    assert item.shape == img_pil.shape == (3, 16, 16) and noise.shape == noise_pil.shape
    assert (item - img_pil).abs().mean() < 0.1, decode


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
def test_data_sets_held_decoded_train_with_each_decoder(tmp_path, decode):
    # Synthetic (like Fashion-MNIST or CIFAR) hands PIL images to the transform.
    over = ["data.name=synthetic", "data.synthetic_size=16", "model.img_size=16", "model.in_chans=3"]
    ds = pretrain_dataset(load_config(None, [*over, f"data.decode={decode}"]))
    if decode == "device":
        sample, _ = ds[3]
        assert sample.image.dtype == torch.uint8 and sample.jpeg is None and sample.index == 3
    else:
        (img, noise), _ = ds[3]
        torch.manual_seed(0)
        (want, want_noise), _ = pretrain_dataset(load_config(None, over))[3]
        assert torch.equal(noise, want_noise) and (img - want).abs().mean() < 0.02


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
                assert torch.equal(a.jpeg, b.jpeg) and (a.height, a.width) == (b.height, b.width)


def _odd_files() -> dict[str, EncodedFile]:
    """Files whose decode_image result differs from what the pil path reads, and a CMYK JPEG."""
    import io

    img = smooth_image(30, 40)
    out = {"cmyk.jpg": encoded(img.convert("CMYK"), "JPEG", "cmyk.jpg"),
           "still.gif": encoded(img.convert("P"), "GIF", "still.gif")}
    frames = [img.convert("P"), img.rotate(90).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out["animated.gif"] = EncodedFile(buf.getvalue(), "animated.gif")
    deep = Image.fromarray(np.asarray(img.convert("L"), np.uint16) * 257).convert("I;16")
    out["deep.png"] = encoded(deep, "PNG", "deep.png")
    return out


@pytest.mark.parametrize("in_chans", [1, 3])
def test_odd_files_decode_as_the_pil_path_reads_them(in_chans):
    from mimkit.data.decode import decode_bytes

    mode = "L" if in_chans == 1 else "RGB"
    for name, file in _odd_files().items():
        got = decode_bytes(file, in_chans)
        assert got.dtype == torch.uint8 and got.shape == (in_chans, 30, 40), name
        with Image.open(__import__("io").BytesIO(file.data)) as im:
            want = torch.from_numpy(np.array(im.convert(mode))).reshape(30, 40, in_chans).permute(2, 0, 1)
        assert (got.int() - want.int()).abs().float().mean() < 2, name  # same picture (decoders may round)
        sample = DeviceCrop(in_chans)(file)
        assert sample.jpeg is None and sample.image.shape == (in_chans, 30, 40), name  # decoded in the worker


def test_an_empty_file_is_named_and_skippable():
    empty = EncodedFile(b"", "photos/empty.jpg")
    for fn in (TensorCrop(24, MEAN, STD, 3), DeviceCrop(3)):
        with pytest.raises(CorruptImageError, match="photos/empty.jpg.*empty file"):
            fn(empty)


def test_a_jpeg_whose_size_differs_from_its_header_is_named():
    good = DeviceCrop(3)(encoded(smooth_image(), where="photos/liar.jpg"))
    good.index, good.height = 0, 61
    with pytest.raises(CorruptImageError, match="photos/liar.jpg.*header says"):
        augment()(DeviceBatch.of([good]), torch.device("cpu"))


def test_crop_chunks_large_groups(monkeypatch):
    import mimkit.data.decode as D

    samples = [DeviceCrop(3)(encoded(smooth_image(60, 80, i))) for i in range(5)]
    for i, s in enumerate(samples):
        s.index = i
    whole = augment()(DeviceBatch.of(samples), torch.device("cpu"))
    monkeypatch.setattr(D, "CROP_CHUNK_PIXELS", 2 * 60 * 80)  # chunks of 2 images
    chunked = augment()(DeviceBatch.of(samples), torch.device("cpu"))
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
