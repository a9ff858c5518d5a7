"""MixedAE (docs/methods/mixedae.md): top-k homologous attention, oracle mask, un-mixing, contrastive loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.config import ConfigError, load_config
from mimkit.masking import mixing_masks
from mimkit.objectives import MAE, MixedAE, build_objective
from mimkit.objectives.mixedae import (
    feature_homologous_accuracy,
    homologous_accuracy,
    homologous_attention_loss,
    homologous_block,
    homologous_contrastive,
    mix_tokens,
    oracle_keep,
    supcon,
    topk_keep,
    unmix_tokens,
)


def test_topk_keeps_exactly_k_patch_keys_plus_cls():
    logits = torch.randn(3, 2, 17, 17, generator=torch.Generator().manual_seed(0))
    keep = topk_keep(logits, 4)
    assert torch.equal(keep[..., 1:, 1:].sum(-1), torch.full((3, 2, 16), 4))
    assert keep[..., 1:, 0].all() and keep[..., 0, :].all()  # cls key always; cls query sees all
    # The kept keys are the largest logits of each query.
    kept_min = logits[..., 1:, 1:].masked_fill(~keep[..., 1:, 1:], float("inf")).min(-1).values
    dropped_max = logits[..., 1:, 1:].masked_fill(keep[..., 1:, 1:], float("-inf")).max(-1).values
    assert (kept_min > dropped_max).all()
    with pytest.raises(ValueError, match="topk"):
        topk_keep(logits, 17)


def test_topk_block_is_a_timm_block_with_that_mask(make_model):
    blk = make_model().blocks[0]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    out, keep, logits = homologous_block(blk, x, 4)
    assert logits.shape == keep.shape == (2, 2, 17, 17) and logits.requires_grad
    torch.testing.assert_close(out, blk(x, attn_mask=keep), rtol=0, atol=1e-6)
    full, keep_all, _ = homologous_block(blk, x, 16)
    assert keep_all.all()
    torch.testing.assert_close(full, blk(x), rtol=0, atol=1e-6)


def test_oracle_block_blocks_cross_source_attention(make_model):
    blk = make_model().blocks[0]
    source = torch.arange(4).repeat_interleave(4)
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(0))
    y = blk(x, attn_mask=oracle_keep(source))
    x2 = x.clone()
    x2[:, 1:][:, source == 1] += 5 * torch.randn(2, 4, 32)  # perturb source 1's patch tokens
    y2 = blk(x2, attn_mask=oracle_keep(source))
    others = torch.cat([torch.tensor([False]), source != 1])  # patch queries of the other sources
    torch.testing.assert_close(y2[:, others], y[:, others], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[:, 1:][:, source == 1], y[:, 1:][:, source == 1])
    assert not torch.allclose(y2[:, 0], y[:, 0])  # the cls query sees every source


def test_oracle_objective_isolates_images_in_one_block(make_model):
    torch.manual_seed(0)
    obj = MixedAE(make_model(depth=1), 0.75, oracle=True)
    imgs, noise = torch.randn(4, 1, 16, 16), torch.rand(4, 16)
    imgs2 = imgs.clone()
    imgs2[2] = torch.randn(1, 16, 16)  # another source of the same mixed sample
    masks = mixing_masks(noise, 4, 4)
    source = obj.source(imgs.device)
    x, _, _ = obj.encode_mixed(mix_tokens(obj.model.embed(imgs), masks, 4), source)
    x2, _, _ = obj.encode_mixed(mix_tokens(obj.model.embed(imgs2), masks, 4), source)
    a, b = unmix_tokens(x, 4), unmix_tokens(x2, 4)
    for image in (0, 1, 3):
        torch.testing.assert_close(b[image, 1:], a[image, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(b[2, 1:], a[2, 1:])


def test_unmixing_returns_every_patch_to_its_image():
    batch, length, ways = 8, 16, 4
    masks = mixing_masks(torch.rand(batch, length, generator=torch.Generator().manual_seed(0)), ways, 4)
    # Identity-like features: token (b, p) carries [b, p].
    b_idx, p_idx = torch.meshgrid(torch.arange(batch), torch.arange(length), indexing="ij")
    tokens = torch.stack([b_idx, p_idx], -1).float()
    mixed = mix_tokens(tokens, masks, ways)  # (2, 16, 2)
    assert mixed.shape == (2, length, 2)
    for g in range(2):
        # Position n of the mixed sequence carries patch n of one image of group g: σ is a bijection.
        assert torch.equal(mixed[g, :, 1].sort().values, torch.arange(length).float())
        assert set(mixed[g, :, 0].long().tolist()) == set(range(g * ways, (g + 1) * ways))
    # Un-mix (with a cls token), then un-shuffle as the decoder does, masked positions = -1.
    with_cls = torch.cat([torch.full((2, 1, 2), -5.0), mixed], dim=1)
    latent = unmix_tokens(with_cls, ways)
    filled = torch.cat([latent[:, 1:], torch.full((batch, length - 4, 2), -1.0)], dim=1)
    placed = torch.gather(filled, 1, masks.ids_restore[..., None].expand(-1, -1, 2))
    visible = masks.mask == 0
    assert torch.equal(placed[visible], tokens[visible])  # each visible patch back at (b, p)
    assert (placed[~visible] == -1).all()
    assert (latent[:, 0] == -5).all()  # every image gets its mixed sample's cls token


def test_one_way_without_contrastive_is_mae(make_model, batch):
    imgs, noise = batch
    mae, mixed = MAE(make_model(), 0.75), MixedAE(make_model(), 0.75, ways=1, hc_weight=0.0, attn_weight=0.0)
    a, b = mae(imgs, noise), mixed(imgs, noise)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.pred, a.pred, rtol=0, atol=1e-6)
    for (name, pa), pb in zip(mae.model.named_parameters(), mixed.model.parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-6, msg=name)


def test_forward_outputs(make_model, batch):
    imgs, noise = batch
    for options in ({}, {"oracle": True}, {"attn_blocks": [1], "segment_embed": "encoder"},
                    {"hc_prototype": True, "segment_embed": "decoder"}):
        out = MixedAE(make_model(), 0.75, **options)(imgs, noise)
        assert out.pred.shape == (8, 16, 16) and out.mask.sum() == 8 * 12
        attn = out.terms.get("loss_attn", 0.0)  # top-k blocks only (none with the oracle)
        assert ("loss_attn" in out.terms) != bool(options.get("oracle"))
        torch.testing.assert_close(out.loss, out.terms["loss_rec"] + 0.5 * out.terms["loss_hc"] + attn)
        assert 0 <= out.terms["acc_homologous"] <= 1 and 0 <= out.terms["acc_homologous_feat"] <= 1
    assert MixedAE(make_model(), 0.75, oracle=True)(imgs, noise).terms["acc_homologous"] == 1


def test_homologous_accuracy():
    source = torch.arange(2).repeat_interleave(2)
    keep = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    assert homologous_accuracy(keep, source) == 0.5
    assert homologous_accuracy(oracle_keep(source)[None, None], source) == 1


def test_attention_loss_is_zero_weight_neutral_and_trains_the_logits(make_model, batch):
    imgs, noise = batch
    a = MixedAE(make_model(), 0.75, attn_weight=0.0)
    b = MixedAE(make_model(), 0.75, attn_weight=2.0)
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(imgs, noise), b(imgs, noise)
    torch.testing.assert_close(out_b.loss, out_a.loss + 2.0 * out_a.terms["loss_attn"])
    out_a.loss.backward()
    out_b.terms["loss_attn"].backward()
    # Without the term the qkv weights get gradient only through the kept logits and values;
    # the term itself reaches them (through q and k) in every homologous block.
    for blk in b.model.blocks:
        assert blk.attn.qkv.weight.grad.abs().sum() > 0
    # SupCon on the patch-to-patch logits: at its minimum, log(2 positives), when same-source keys
    # score highest.
    source = torch.arange(2).repeat_interleave(3)
    same = (source[:, None] == source[None, :]).float()
    good = torch.zeros(1, 1, 7, 7)
    good[..., 1:, 1:] = 10 * same
    assert homologous_attention_loss(good, source) < math.log(2) + 0.01 < homologous_attention_loss(-good, source)
    torch.testing.assert_close(homologous_attention_loss(good, source), supcon(good[..., 1:, 1:], source))


def test_feature_homologous_accuracy():
    source = torch.arange(2).repeat_interleave(3)
    grouped = F.one_hot(source, 4).float()[None] + 0.01 * torch.randn(1, 6, 4)
    assert feature_homologous_accuracy(F.normalize(grouped, dim=-1), source) == 1
    # Unit vectors at these angles: each patch's two nearest are the other image's.
    angles = torch.deg2rad(torch.tensor([0.0, 120.0, 240.0, 5.0, 125.0, 245.0]))
    crossed = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    assert feature_homologous_accuracy(crossed, source) == 0


def test_homologous_contrastive_matches_supcon_and_prefers_separated_sources():
    g = torch.Generator().manual_seed(0)
    source = torch.arange(2).repeat_interleave(3)
    z = F.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    expected = []
    for s in range(2):
        for i in range(6):
            denom = torch.logsumexp(torch.stack([z[s, i] @ z[s, a] / 0.2 for a in range(6) if a != i]), 0)
            pos = [z[s, i] @ z[s, p] / 0.2 - denom for p in range(6) if p != i and source[p] == source[i]]
            expected.append(-torch.stack(pos).mean())
    torch.testing.assert_close(homologous_contrastive(z, source, 0.2), torch.stack(expected).mean())
    separated = F.one_hot(source, 8).float()[None].expand(2, -1, -1)
    for prototype in (False, True):
        assert homologous_contrastive(separated, source, 0.2, prototype) < homologous_contrastive(
            z, source, 0.2, prototype)


def test_batch_not_divisible_by_ways_errors(make_model):
    obj = MixedAE(make_model(), 0.75)
    with pytest.raises(ValueError, match="train.batch_size"):
        obj(torch.randn(6, 1, 16, 16), torch.rand(6, 16))
    cfg = load_config("fmnist_tiny", ["method=mixedae", "train.batch_size=30", "model.img_size=16",
                                      "model.depth=1"])
    with pytest.raises(ConfigError, match="train.batch_size"):
        build_objective(cfg, make_model())


def test_bad_options_error(make_model):
    with pytest.raises(ValueError, match="mixedae.ways"):
        MixedAE(make_model(), 0.75, ways=8)
    with pytest.raises(ValueError, match="not an integer"):
        MixedAE(make_model(), 0.7)
    with pytest.raises(ValueError, match="attn_blocks"):
        MixedAE(make_model(), 0.75, attn_blocks=[2])
