"""Prediction-consistency metric and its CLI."""

import json

import pytest
import torch

from mimkit.cli import main
from mimkit.config import load_config, to_dict
from mimkit.eval.consistency import prediction_consistency
from mimkit.masking import random_masking
from mimkit.models.mae import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny():
    torch.manual_seed(0)
    return build_model("vit_tiny_small_images", img_size=16, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def test_matches_direct_computation_and_is_deterministic():
    model, imgs = tiny(), torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = prediction_consistency(model, imgs, num_masks=3, seed=5, batch_size=4)
    noise = torch.rand(6, 3, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outs = [model(imgs, masks=random_masking(noise[:, r], 0.75)) for r in range(3)]
    num, den = 0.0, 0.0
    for a in range(3):
        for b in range(a + 1, 3):
            both = outs[a].mask * outs[b].mask
            num += float((((outs[a].pred - outs[b].pred) ** 2).mean(-1) * both).sum())
            den += float(both.sum())
    assert result["pairwise_mse"] == pytest.approx(num / den, rel=1e-5)
    assert result["rec_loss"] == pytest.approx(sum(float(o.loss) for o in outs) / 3, rel=1e-5)
    assert prediction_consistency(model, imgs, num_masks=3, seed=5, batch_size=6) == pytest.approx(result)


def test_two_masks_pairwise_is_twice_the_variance_and_constant_model_is_consistent():
    model, imgs = tiny(), torch.randn(4, 1, 16, 16)
    r = prediction_consistency(model, imgs, num_masks=2)
    assert r["pairwise_mse"] == pytest.approx(2 * r["variance"], rel=1e-5) and r["pairwise_mse"] > 0
    with torch.no_grad():  # a decoder that ignores its input predicts the same whatever the mask
        model.decoder_pred.weight.zero_()
    r = prediction_consistency(model, imgs, num_masks=3)
    assert r["pairwise_mse"] == 0 and r["variance"] == 0
    with pytest.raises(ValueError, match="num_masks"):
        prediction_consistency(model, imgs, num_masks=1)


def test_cli(tmp_path, capsys):
    cfg = load_config("fmnist_tiny", ["data.name=synthetic", "data.synthetic_size=32", "model.img_size=16",
                                      "data.num_workers=0"])
    model = tiny()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": "mimkit-v1", "arch": model.arch, "model": model.state_dict(),
                "norm_pix_loss": True, "config": to_dict(cfg), "method": "mae"}, ckpt)
    out = tmp_path / "c.json"
    assert main(["eval", "consistency", "--checkpoint", str(ckpt), "--num-images", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 8 and result["pairwise_mse"] > 0
    assert json.loads(capsys.readouterr().out)["variance"] == result["variance"]
