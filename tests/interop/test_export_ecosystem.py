"""Exports that the ecosystem loads: timm ``local-dir:``, AutoImageProcessor, the Hub upload."""

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mimkit
from mimkit.cli import main
from tests.conftest import save_mimkit_checkpoint, tiny_config

MEAN, STD = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]


@pytest.fixture
def run_ckpt(tmp_path):
    """An RGB run with its own data statistics and a k-NN record beside the checkpoint."""
    path = tmp_path / "run" / "checkpoint-00000001.pt"
    path.parent.mkdir()
    save_mimkit_checkpoint(path, tiny_config(f"data.mean={MEAN}", f"data.std={STD}"))
    (path.parent / "eval_knn.json").write_text(json.dumps({"protocol": "knn", "metric": "knn_top1",
                                                           "value": 0.8125}))
    return path


def test_timm_folder_loads_with_the_encoders_data_config(run_ckpt, tmp_path, capsys):
    out = tmp_path / "timm_enc"
    assert main(["export", "--checkpoint", str(run_ckpt), "--format", "timm", "--out", str(out)]) == 0
    assert f"local-dir:{out}" in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 16, 16)
    assert data["mean"] == pytest.approx(MEAN) and data["std"] == pytest.approx(STD)
    assert (data["crop_pct"], data["crop_mode"], data["interpolation"]) == (1.0, "squash", "bicubic")
    assert model.num_classes == 0 and model.pretrained_cfg["num_classes"] == 0
    assert not model.pretrained_cfg.get("hf_hub_id") and not model.pretrained_cfg.get("url")

    mae = mimkit.load_model(run_ckpt)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.forward_features(x), mae.forward_features(x), atol=1e-5, rtol=0)
    enc = mimkit.load_encoder(out, global_pool="token")  # mimkit reads the folder back
    torch.testing.assert_close(enc.forward_features(x), mae.forward_features(x), atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    assert "library_name: timm" in card and "knn_top1 | 81.25%" in card


def test_timm_folder_grayscale_run(tmp_path):
    path = tmp_path / "ck.pt"
    save_mimkit_checkpoint(path, tiny_config("model.in_chans=1", "data.name=fashion_mnist"))
    out = tmp_path / "enc"
    assert main(["export", "--checkpoint", str(path), "--format", "timm", "--out", str(out)]) == 0
    data = timm.data.resolve_data_config(model=timm.create_model(f"local-dir:{out}", pretrained=True))
    assert data["input_size"] == (1, 16, 16) and data["mean"] == pytest.approx((0.2860,))


def test_hf_folder_has_image_processor_and_model_card(run_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run_ckpt), "--format", "hf", "--out", str(out)]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    assert type(processor).__name__.startswith("ViTImageProcessor")
    assert list(processor.image_mean) == pytest.approx(MEAN) and list(processor.image_std) == pytest.approx(STD)
    img = Image.fromarray(np.full((40, 30, 3), 255, dtype=np.uint8))
    pixels = processor(img, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)
    expected = (1.0 - torch.tensor(MEAN)) / torch.tensor(STD)  # white, normalized by the run's stats
    torch.testing.assert_close(pixels[0, :, 0, 0], expected, atol=1e-4, rtol=0)
    model = transformers.ViTMAEForPreTraining.from_pretrained(str(out))
    assert model(pixel_values=pixels).loss.isfinite()

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    for text in ("`mae`", "mask ratio 0.75", "Data: `synthetic`", "| knn | knn_top1 | 81.25% |", "blocks"):
        assert text in card, text


def test_hf_processor_grayscale_keeps_one_channel(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "ck.pt"
    save_mimkit_checkpoint(path, tiny_config("model.in_chans=1", "data.name=fashion_mnist"))
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(path), "--format", "hf", "--out", str(out)]) == 0
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    gray = Image.fromarray(np.zeros((20, 24), dtype=np.uint8), "L")
    assert processor(gray, return_tensors="pt")["pixel_values"].shape == (1, 1, 16, 16)
    assert "grayscale" in (out / "README.md").read_text()


class FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, folder_path, repo_id, **kw):
        FakeApi.calls.append(("upload_folder", repo_id, sorted(p.name for p in __import__("pathlib").Path(
            folder_path).iterdir())))
        return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_the_export_folder(run_ckpt, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(run_ckpt), "--format", "hf", "--out", str(out),
                 "--push-to-hub", "me/tiny-mae", "--private"]) == 0
    (_, repo, kw), (_, repo2, files) = FakeApi.calls
    assert repo == repo2 == "me/tiny-mae" and kw["private"] and kw["exist_ok"]
    assert files == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    assert "uploaded to https://hub.example/me/tiny-mae" in capsys.readouterr().out

    FakeApi.calls = []  # a single file is not a repo: refused before anything is written
    assert main(["export", "--checkpoint", str(run_ckpt), "--format", "timm", "--out",
                 str(tmp_path / "e.safetensors"), "--push-to-hub", "me/x"]) == 2
    assert "--push-to-hub uploads a folder" in capsys.readouterr().err
    assert FakeApi.calls == [] and not (tmp_path / "e.safetensors").exists()
