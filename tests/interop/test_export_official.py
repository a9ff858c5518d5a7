import torch
from PIL import Image

import mimkit
from mimkit.cli import main
from mimkit.engine.checkpoint import load_file
from mimkit.interop.official import to_official
from mimkit.models import model_from_config


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_official_round_trip_full_and_encoder_only(tiny_ckpt, tmp_path):
    src = load_file(tiny_ckpt)["model"]
    full, enc = tmp_path / "full.pth", tmp_path / "enc.pth"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "mae", "--out", str(full)]) == 0
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "mae", "--out", str(enc),
                 "--encoder-only"]) == 0
    assert_same_state(load_file(full)["model"], src)
    assert_same_state(mimkit.load_model(full).state_dict(), src)
    enc_state = load_file(enc)["model"]
    assert not any(k.startswith(("decoder", "mask_token")) for k in enc_state)
    assert_same_state(enc_state, {k: v for k, v in src.items() if k in enc_state})
    # official -> official is lossless too
    again = tmp_path / "again.pth"
    assert main(["export", "--checkpoint", str(full), "--format", "mae", "--out", str(again)]) == 0
    assert_same_state(load_file(again)["model"], src)


def test_safetensors_round_trip(tiny_ckpt, tmp_path):
    src = load_file(tiny_ckpt)["model"]
    out = tmp_path / "w.safetensors"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "safetensors", "--out", str(out)]) == 0
    model = mimkit.load_model(out)
    assert_same_state(model.state_dict(), src)
    assert model.arch == load_file(tiny_ckpt)["arch"]


def test_plain_official_full_checkpoint_visualizes(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    model = model_from_config(tiny_cfg)
    ckpt = tmp_path / "mae_visualize_tiny.pth"
    torch.save(to_official(model), ckpt)  # exactly {'model': state_dict}, no arch
    loaded = mimkit.load_model(ckpt, num_heads=2)
    assert_same_state(loaded.state_dict(), model.state_dict())
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (24, 24), (40 * i, 90, 200 - 30 * i)).save(imgs / f"{i}.png")
    out = tmp_path / "grid.png"
    assert main(["visualize", "--checkpoint", str(ckpt), "--images", str(imgs), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
