import timm
import torch
from safetensors.torch import load_file

import mimkit
from mimkit.cli import main
from mimkit.interop.timm import create_model_call, timm_kwargs


def test_timm_export_loads_strict_with_same_features(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "timm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    mae = mimkit.load_model(tiny_ckpt)
    call = create_model_call(mae.arch)
    assert call in printed and call.startswith("timm.create_model('vit_base_patch16_224', img_size=16")
    state = load_file(out)
    assert not any(k.startswith(("decoder", "mask_token")) for k in state)

    x = torch.randn(4, 3, 16, 16)
    expected = mae.forward_features(x)
    custom = timm.models.VisionTransformer(**timm_kwargs(mae.arch))  # explicit kwargs
    created = eval(call, {"timm": timm})  # the printed call
    for model in (custom, created):
        model.load_state_dict(state, strict=True)
        torch.testing.assert_close(model.eval().forward_features(x), expected, atol=1e-5, rtol=0)
    # and back: load_encoder reads the export
    enc = mimkit.load_encoder(out, global_pool="token")
    torch.testing.assert_close(enc.forward_features(x), expected, atol=1e-5, rtol=0)


def test_known_arch_maps_to_registered_name():
    arch = dict(img_size=[224, 224], patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                mlp_ratio=4.0)
    assert create_model_call(arch) == "timm.create_model('vit_base_patch16_224', num_classes=0, global_pool='token')"
    arch.update(embed_dim=1280, depth=32, num_heads=16, patch_size=14)
    assert create_model_call(arch).startswith("timm.create_model('vit_huge_patch14_224'")


def test_load_encoder_default_is_finetune_ready(tiny_ckpt):
    enc = mimkit.load_encoder(tiny_ckpt, num_classes=7, drop_path_rate=0.1)
    assert enc.global_pool == "avg" and isinstance(enc.norm, torch.nn.Identity)
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    bigger = mimkit.load_encoder(tiny_ckpt, img_size=32)  # position table resized
    assert bigger.pos_embed.shape == (1, 1 + 64, 32)
