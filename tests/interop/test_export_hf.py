import json

import pytest
import torch

import mimkit
from mimkit.cli import main
from mimkit.engine.checkpoint import load_file

transformers = pytest.importorskip("transformers")


def test_hf_export_loads_in_transformers_with_equal_loss(tiny_ckpt, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["layer_norm_eps"] == 1e-6
    hf = transformers.ViTMAEForPreTraining.from_pretrained(str(out)).eval()
    mae = mimkit.load_model(tiny_ckpt)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        ours = mae(imgs, noise=noise).loss
        theirs = hf(pixel_values=imgs, noise=noise).loss
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=1e-5)

    back = mimkit.load_model(out)  # import the folder again: lossless
    src = load_file(tiny_ckpt)["model"]
    for k, v in back.state_dict().items():
        assert torch.equal(v, src[k]), k
    assert back.arch == mae.arch and back.norm_pix_loss == mae.norm_pix_loss


def test_hf_export_needs_the_decoder(tiny_ckpt, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "hf", "--out", str(tmp_path / "x"),
                 "--encoder-only"]) == 2
    assert "decoder" in capsys.readouterr().err


def test_import_transformers_4_layout_folder(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    from mimkit.interop.hf import hf_config_kwargs, to_hf_state_dict

    mae = mimkit.load_model(tiny_ckpt)
    folder = tmp_path / "hf4"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in to_hf_state_dict(mae.state_dict(), new_layout=False).items()}
    save_file(state, str(folder / "model.safetensors"))
    cfg = {"model_type": "vit_mae", "architectures": ["ViTMAEForPreTraining"], **hf_config_kwargs(mae)}
    (folder / "config.json").write_text(json.dumps(cfg))
    back = mimkit.load_model(folder)
    for k, v in mae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    enc = mimkit.load_encoder(folder, global_pool="token")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(enc.forward_features(x), mae.forward_features(x), atol=1e-5, rtol=0)
