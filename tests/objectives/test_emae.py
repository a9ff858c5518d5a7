"""EMAE: stacked vs sequential parts, self-consistency, reduction to MAE (docs/methods/emae.md)."""

import pytest
import torch

from mimkit.masking import partition_masking
from mimkit.models.mae import masked_mean
from mimkit.objectives import EMAE, MAE
from mimkit.objectives.emae import self_consistency


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sc_target", ["other", "mean"])
def test_stacked_and_sequential_give_same_loss_and_gradients(make_model, batch, sc_target):
    imgs, noise = batch
    results = []
    for sequential in (False, True):
        obj = EMAE(make_model(), 0.75, sc_target=sc_target, sequential=sequential)
        out = obj(imgs, noise)
        out.loss.backward()
        results.append((out, grads(obj)))
    (a, ga), (b, gb) = results
    for x, y in ((a.loss, b.loss), (a.preds, b.preds), *((a.terms[k], b.terms[k]) for k in ("loss_rec", "loss_sc"))):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 10
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=0, atol=1e-6, msg=name)


def test_one_part_without_consistency_is_mae(make_model, batch):
    imgs, noise = batch
    mae, emae = MAE(make_model(), 0.75), EMAE(make_model(), 0.75, num_parts=1, sc_weight=0.0)
    a, b = mae(imgs, noise), emae(imgs, noise)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.pred, a.pred, rtol=0, atol=1e-6)
    assert torch.equal(b.mask, a.mask)
    ga, gb = grads(mae), grads(emae)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=0, atol=1e-6, msg=name)


def test_reconstruction_is_the_mean_of_per_part_mae_losses(make_model, batch):
    imgs, noise = batch
    obj = EMAE(make_model(), 0.75, sc_weight=0.5)
    out = obj(imgs, noise, progress=0.3)
    parts = partition_masking(noise, 4)
    mae_losses = [obj.model(imgs, masks=p).loss for p in parts]
    torch.testing.assert_close(out.terms["loss_rec"], torch.stack(mae_losses).mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, out.terms["loss_rec"] + 0.5 * out.terms["loss_sc"])
    assert out.preds.shape == (4 * 8, 16, 16) and torch.equal(out.rows, torch.arange(8).repeat(4))


def test_self_consistency_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(2, 16, 3, generator=g) for _ in range(4)]
    masks = [p.mask for p in partition_masking(torch.rand(2, 16, generator=g), 4)]
    expected = []
    for i in range(4):
        for j in range(4):
            if i != j:
                expected.append(masked_mean((preds[i] - preds[j]) ** 2, masks[i] * masks[j]))
    torch.testing.assert_close(self_consistency(preds, masks, "mse", "other"), torch.stack(expected).mean())
    # "mean": part i vs sg(mean of the other parts that mask the same patch), averaged over parts.
    expected = []
    for i in range(4):
        others = [j for j in range(4) if j != i]
        count = sum(masks[j] for j in others)
        mean = sum(preds[j] * masks[j][..., None] for j in others) / count.clamp(min=1)[..., None]
        expected.append(masked_mean((preds[i] - mean) ** 2, masks[i] * (count > 0)))
    torch.testing.assert_close(self_consistency(preds, masks, "mse", "mean"), torch.stack(expected).mean())
    # With identical predictions every distance is zero.
    same = [preds[0]] * 4
    for distance in ("mse", "l1", "smooth_l1"):
        for target in ("other", "mean"):
            assert self_consistency(same, masks, distance, target) == 0


def test_self_consistency_stops_gradient_on_target():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 16, 3, generator=g, requires_grad=True)
    b = torch.randn(1, 16, 3, generator=g, requires_grad=True)
    masks = [p.mask for p in partition_masking(torch.rand(1, 16, generator=g), 4)][:2]
    self_consistency([a, b], masks, "mse", "other").backward()
    # d/da only through (a - sg(b)) terms: equals the gradient of the (0,1) pair alone, times 1/2.
    a2 = a.detach().clone().requires_grad_(True)
    (0.5 * masked_mean((a2 - b.detach()) ** 2, masks[0] * masks[1])).backward()
    torch.testing.assert_close(a.grad, a2.grad)


def test_no_overlap_gives_zero_not_nan(make_model, batch):
    imgs, noise = batch
    out = EMAE(make_model(), 0.5)(imgs, noise)  # K = 2: a patch masked in one part is visible in the other
    assert out.terms["loss_sc"] == 0 and torch.isfinite(out.loss)


def test_sc_warmup_is_linear_in_progress(make_model):
    obj = EMAE(make_model(), 0.75, sc_weight=2.0, sc_warmup=0.5)
    assert [obj.sc_lambda(p) for p in (0.0, 0.25, 0.5, 1.0)] == [0.0, 1.0, 2.0, 2.0]
    assert EMAE(make_model(), 0.75, sc_weight=2.0).sc_lambda(0.0) == 2.0


def test_bad_parts_errors(make_model):
    with pytest.raises(ValueError, match="not an integer"):
        EMAE(make_model(), 0.7)
    with pytest.raises(ValueError, match="do not divide"):
        EMAE(make_model(img_size=20), 0.75)  # L = 25
    with pytest.raises(ValueError, match="num_parts=5"):
        EMAE(make_model(), 0.75, num_parts=5)
