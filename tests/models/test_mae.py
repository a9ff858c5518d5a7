import math

import pytest
import torch

import mimkit
from mimkit.masking import random_masking
from mimkit.models.mae import build_model
from mimkit.models.vit import resize_pos_embed, sincos_2d
from tests.conftest import TINY_MODEL


def test_sincos_table_matches_formula():
    dim, gh, gw = 16, 3, 5
    table = sincos_2d(dim, (gh, gw))[0]
    assert table.shape == (1 + gh * gw, dim)
    assert torch.equal(table[0], torch.zeros(dim))  # cls row
    q = dim // 4
    for n in range(gh * gw):
        row, col = divmod(n, gw)
        for k in range(q):
            omega = 10000 ** (-k / q)
            # first half encodes the column (x) coordinate, as the official meshgrid(w, h)
            assert table[1 + n, k].item() == pytest.approx(math.sin(col * omega), abs=1e-6)
            assert table[1 + n, q + k].item() == pytest.approx(math.cos(col * omega), abs=1e-6)
            assert table[1 + n, 2 * q + k].item() == pytest.approx(math.sin(row * omega), abs=1e-6)
            assert table[1 + n, 3 * q + k].item() == pytest.approx(math.cos(row * omega), abs=1e-6)


def test_position_tables_are_fixed_and_not_trained(tiny_model):
    assert not tiny_model.pos_embed.requires_grad and not tiny_model.decoder_pos_embed.requires_grad
    assert torch.equal(tiny_model.pos_embed, sincos_2d(32, (4, 4)))


def test_resize_pos_embed_keeps_cls_and_identity():
    t = sincos_2d(16, (4, 4))
    assert torch.equal(resize_pos_embed(t, (4, 4), (4, 4)), t)
    r = resize_pos_embed(t, (4, 4), (6, 6))
    assert r.shape == (1, 37, 16) and torch.equal(r[:, 0], t[:, 0])


def test_norm_pix_loss_unbiased_on_masked_patches_only(tiny_model):
    imgs = torch.randn(3, 1, 16, 16)
    noise = torch.rand(3, 16)
    out = tiny_model(imgs, noise=noise)
    # reference computed independently from the docs/methods/mae.md formula
    t = tiny_model.patchify(imgs)
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)  # unbiased
    t_hat = (t - mean) / torch.sqrt(var + 1e-6)
    m = random_masking(noise, 0.75).mask
    per_patch = ((out.pred - t_hat) ** 2).mean(-1)
    ref = (per_patch * m).sum() / m.sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    # visible patches do not count: changing their prediction leaves the loss unchanged
    pred2 = out.pred.detach().clone()
    pred2[m == 0] += 100.0
    torch.testing.assert_close(tiny_model.forward_loss(imgs, pred2, out.mask), out.loss.detach())


def test_raw_pixel_target_when_norm_pix_off():
    model = build_model("vit_tiny_small_images", img_size=16, in_chans=3, norm_pix_loss=False, **TINY_MODEL)
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.target(imgs), model.patchify(imgs))


def test_same_noise_same_output_and_shapes(tiny_model):
    imgs = torch.randn(2, 1, 16, 16)
    noise = torch.rand(2, 16)
    a, b = tiny_model(imgs, noise=noise), tiny_model(imgs, noise=noise)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.pred, b.pred)
    assert a.pred.shape == (2, 16, 16) and a.mask.shape == (2, 16) and a.ids_restore.shape == (2, 16)


@pytest.mark.parametrize("in_chans,img_size", [(3, 32), (1, 16)])
def test_parity_with_huggingface_vitmae(in_chans, img_size):
    pytest.importorskip("transformers")
    from mimkit.interop.hf import to_hf_model

    torch.manual_seed(0)
    model = build_model("vit_tiny_small_images", img_size=img_size, in_chans=in_chans, **TINY_MODEL).eval()
    hf = to_hf_model(model)
    imgs = torch.randn(3, in_chans, img_size, img_size)
    noise = torch.rand(3, model.num_patches)
    ours, theirs = model(imgs, noise=noise), hf(pixel_values=imgs, noise=noise)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pred, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.mask, theirs.mask)


def test_image_size_must_divide_patch():
    with pytest.raises(ValueError, match="not divisible"):
        build_model("vit_tiny_small_images", img_size=30)


def test_init_follows_official_recipe(tiny_model):
    for name, m in tiny_model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0, name
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound + 1e-6, name
        if isinstance(m, torch.nn.LayerNorm):
            assert m.eps == 1e-6 and torch.equal(m.weight, torch.ones_like(m.weight)), name


def test_load_official_checkpoints(tmp_path, tiny_model):
    imgs, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    full = tmp_path / "mae_full.pth"
    torch.save({"model": tiny_model.state_dict(), "epoch": 799}, full)
    loaded = mimkit.load_model(full, num_heads=2, decoder_num_heads=2)
    ref = tiny_model.eval()(imgs, noise=noise)
    got = loaded(imgs, noise=noise)
    assert torch.equal(got.loss, ref.loss) and torch.equal(got.pred, ref.pred)
    # encoder-only file: encoder weights load, decoder is fresh
    enc = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_pretrain.pth")
    enc_model = mimkit.load_model(tmp_path / "mae_pretrain.pth", num_heads=2)
    torch.testing.assert_close(enc_model.forward_features(imgs), tiny_model.forward_features(imgs))
    assert enc_model.decoder_embed.in_features == 32 and enc_model.arch["decoder_embed_dim"] == 512


def test_infer_heads_rule(tmp_path, tiny_model):
    torch.save({"model": tiny_model.state_dict()}, tmp_path / "m.pth")
    # no override: heads inferred as D/64 (min 1) for the encoder, D_dec/32 for the decoder
    m = mimkit.load_model(tmp_path / "m.pth")
    assert m.arch["num_heads"] == 1 and m.arch["decoder_num_heads"] == 1
