"""The speed-ups in the model keep the official MAE values (docs/methods/mae.md)."""

import torch

from mimkit.masking import gather_tokens, random_masking
from mimkit.models.mae import build_model
from tests.conftest import TINY_MODEL


def official_decoder(model, latent, ids_restore):
    """The official order: cat mask tokens, un-shuffle, cat cls, add the table."""
    x = model.decoder_embed(latent)
    b, n = x.shape[0], ids_restore.shape[1] + 1 - x.shape[1]
    x_ = gather_tokens(torch.cat([x[:, 1:], model.mask_token.expand(b, n, -1)], dim=1), ids_restore)
    x = torch.cat([x[:, :1], x_], dim=1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    return model.decoder_pred(model.decoder_norm(x))[:, 1:]


def test_decoder_scatter_equals_official_cat_gather():
    torch.manual_seed(0)
    model = build_model("vit_tiny_small_images", img_size=16, in_chans=3, **TINY_MODEL)
    imgs, noise = torch.randn(3, 3, 16, 16), torch.rand(3, 16)
    masks = random_masking(noise, 0.75)
    latent = model.forward_encoder(imgs, masks.ids_keep)
    ref = official_decoder(model, latent, masks.ids_restore)
    assert torch.equal(model.forward_decoder(latent, masks.ids_restore, masks.ids_keep), ref)
    assert torch.equal(model.forward_decoder(latent, masks.ids_restore), ref)  # ids_keep derived
    # gradients agree up to summation order
    g = torch.randn_like(ref)
    params = [model.mask_token, model.decoder_embed.weight]
    ours = torch.autograd.grad(model.forward_decoder(latent, masks.ids_restore), params, g)
    theirs = torch.autograd.grad(official_decoder(model, latent, masks.ids_restore), params, g)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_blocks_use_fused_attention():
    model = build_model("vit_tiny_small_images", img_size=16, in_chans=1, **TINY_MODEL)
    assert all(blk.attn.fused_attn for blk in [*model.blocks, *model.decoder_blocks])
