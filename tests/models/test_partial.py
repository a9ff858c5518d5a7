"""Partial reconstruction (``decoder.predict_ratio``): a seeded subset of the masked patches."""

import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.masking import predicted_subset, random_masking, second_draw
from mimkit.models import model_from_config
from mimkit.models.mae import build_model
from mimkit.objectives import MAE, EMATeacher, build_objective
from tests.conftest import TINY_MODEL, TINY_OVERRIDES


def _model(**kw):
    torch.manual_seed(0)
    return build_model("vit_tiny_small_images", img_size=16, in_chans=1, **{**TINY_MODEL, "decoder_depth": 2, **kw})


def _batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.rand(n, 16, generator=g)


def test_second_draw_is_a_bijection_of_the_24_random_bits():
    k = torch.randperm(2**24)[:100000]
    key = second_draw(k.float() / 2**24) * 2**24
    assert torch.equal(key, key.round())  # exact in float32
    rotated = key.long()
    assert torch.equal(rotated, (k % 4096) * 4096 + k // 4096)
    assert rotated.unique().numel() == k.numel()


def test_subset_is_masked_sized_and_a_pure_function_of_the_noise():
    _, noise = _batch(8)
    masks = random_masking(noise, 0.75)
    ids = predicted_subset(noise, masks, 0.5)
    assert ids.shape == (8, 6)  # int(12 masked * 0.5)
    assert torch.equal(masks.mask.gather(1, ids), torch.ones(8, 6))  # only masked patches
    assert torch.equal(ids, predicted_subset(noise.clone(), masks, 0.5))
    assert predicted_subset(noise, masks, 0.01).shape == (8, 1)  # at least one
    assert torch.equal(predicted_subset(noise, masks, 1.0).sort(1).values,
                       masks.mask.nonzero()[:, 1].view(8, 12))
    with pytest.raises(ValueError, match="predict_ratio"):
        predicted_subset(noise, masks, 0.0)


def test_subset_is_drawn_independently_of_the_mask_order():
    # Were the subset the masked patches with the smallest *masking* noise, their mean rank
    # among the masked ones would be about 1/8; an independent draw gives 1/2. Every patch
    # position is chosen about equally often.
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(4096, 64, generator=g)
    masks = random_masking(noise, 0.75)
    ids = predicted_subset(noise, masks, 0.25)  # 12 of the 48 masked
    rank_in_masked = (noise.argsort(1).argsort(1) - 16).float() / 47  # 0..1 over masked ones
    mean_rank = rank_in_masked.gather(1, ids).mean().item()
    assert abs(mean_rank - 0.5) < 0.01
    counts = torch.bincount(ids.flatten(), minlength=64).float()
    expected = ids.numel() / 64
    assert (counts - expected).abs().max() < 0.1 * expected


def test_all_masked_subset_equals_the_full_decoder():
    """Decoding visible + all mask tokens in another order is MAE up to summation order."""
    model = _model()
    imgs, noise = _batch()
    masks = random_masking(noise, 0.75)
    full = model(imgs, masks=masks)
    part = model(imgs, masks=masks, ids_pred=predicted_subset(noise, masks, 1.0))
    torch.testing.assert_close(part.loss, full.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.pred, full.pred * masks.mask[..., None], rtol=1e-5, atol=1e-5)
    assert torch.equal(part.scored, masks.mask)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(part.loss, params), torch.autograd.grad(full.loss, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_partial_loss_scores_only_the_subset_and_decodes_fewer_tokens():
    model = _model()
    imgs, noise = _batch()
    masks = random_masking(noise, 0.75)
    ids = predicted_subset(noise, masks, 0.25)  # 3 of 12 masked patches
    seen = []
    hook = model.decoder_blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    out = model(imgs, masks=masks, ids_pred=ids)
    hook.remove()
    assert seen == [1 + 4 + 3]  # cls + visible + predicted
    # the loss is the mean squared error against the norm-pix target on exactly those patches
    target = model.target(imgs).gather(1, ids[..., None].expand(-1, -1, 16))
    pred = out.pred.gather(1, ids[..., None].expand(-1, -1, 16))
    torch.testing.assert_close(out.loss, ((pred - target) ** 2).mean())
    assert torch.equal(out.scored.sum(1), torch.full((4,), 3.0))
    assert (out.pred[out.scored == 0] == 0).all()


def test_predict_ratio_one_is_exactly_mae():
    model = _model()
    imgs, noise = _batch()
    a = MAE(model, 0.75)(imgs, noise)
    b = MAE(model, 0.75, predict_ratio=1.0)(imgs, noise)
    ref = model(imgs, noise=noise)
    assert torch.equal(a.loss, ref.loss) and torch.equal(b.loss, ref.loss)
    assert torch.equal(b.pred, ref.pred)


def _cfg(*extra):
    return load_config(None, [*TINY_OVERRIDES, *extra])


def test_config_builds_partial_mae_and_refuses_other_methods():
    cfg = _cfg("decoder.predict_ratio=0.25")
    obj = build_objective(cfg, model_from_config(cfg))
    assert isinstance(obj, MAE) and obj.predict_ratio == 0.25
    imgs, noise = _batch(8)
    out = obj(imgs, noise)
    assert out.masks.mask.sum(1).eq(3).all() and out.mask.sum(1).eq(12).all()
    for method in ("emae", "mixedae", "emae+rcmae"):
        cfg = _cfg("decoder.predict_ratio=0.5", f"method={method}")
        with pytest.raises(ConfigError, match="decoder.predict_ratio"):
            build_objective(cfg, model_from_config(cfg))
    with pytest.raises(ConfigError, match="decoder.predict_ratio"):
        _cfg("decoder.predict_ratio=1.5")


def test_rcmae_teacher_scores_the_same_subset():
    cfg = _cfg("decoder.predict_ratio=0.5", "method=rcmae")
    obj = build_objective(cfg, model_from_config(cfg))
    assert isinstance(obj, EMATeacher)
    imgs, noise = _batch(8)
    out = obj(imgs, noise)
    scored = out.masks.mask
    assert scored.sum(1).eq(6).all()
    # the teacher term is the masked mean over the scored patches of the full teacher prediction
    masks = random_masking(noise, cfg.mask_ratio)
    with torch.no_grad():
        target = obj.teacher(imgs, masks=masks).pred
    per_patch = ((out.preds - target) ** 2).mean(-1)
    torch.testing.assert_close(out.terms["loss_teacher"], (per_patch * scored).sum() / scored.sum())


def test_partial_rcmae_with_checkpointing_resumes_exactly(tmp_path):
    """The subset is drawn from the pipeline's noise, so resume stays bit for bit."""
    from mimkit.engine.checkpoint import list_checkpoints
    from mimkit.engine.logging import read_metrics
    from mimkit.engine.trainer import pretrain

    over = [*TINY_OVERRIDES, "method=rcmae", "decoder.predict_ratio=0.25", "train.grad_checkpointing=true",
            "train.max_steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    want = {r["step"]: r["loss"] for r in read_metrics(pretrain(load_config(None, over), tmp_path / "a"))}
    run = pretrain(load_config(None, over), tmp_path / "b")
    for step, path in list_checkpoints(run):
        if step > 3:
            path.unlink()
    got = {r["step"]: r["loss"] for r in read_metrics(pretrain(None, run, resume=True))}
    assert got == want and len(want) == 6
