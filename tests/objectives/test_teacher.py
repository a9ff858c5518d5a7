"""EMA teacher (RC-MAE, docs/methods/rcmae.md): no gradients, exact EMA, schedules, composition."""

import math

import pytest
import torch
from timm.optim import param_groups_weight_decay

from mimkit.masking import mirror_masks, partition_masking, random_masking
from mimkit.models.mae import masked_mean
from mimkit.objectives import EMAE, MAE, EMATeacher
from mimkit.objectives.teacher import ema_momentum, teacher_predict


def test_teacher_gets_no_gradient_and_is_not_optimised(make_model, batch):
    imgs, noise = batch
    obj = EMATeacher(MAE(make_model(), 0.75))
    obj.train()
    assert not obj.teacher.training and obj.model.training
    out = obj(imgs, noise)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert any(p.grad is not None for p in obj.model.parameters())
    optimised = {id(p) for g in param_groups_weight_decay(obj, 0.05) for p in g["params"]}
    assert not optimised & {id(p) for p in obj.teacher.parameters()}
    assert optimised == {id(p) for p in obj.model.parameters() if p.requires_grad}
    # The student is registered once; the teacher is a separate copy.
    keys = obj.state_dict().keys()
    assert "base.model.cls_token" in keys and "teacher.cls_token" in keys and "model.cls_token" not in keys


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_teacher_moves_exactly_by_the_ema_formula(make_model, schedule):
    obj = EMATeacher(MAE(make_model(), 0.75), momentum=0.9, momentum_end=1.0, schedule=schedule,
                     max_window=0.0)
    before = {n: p.detach().clone() for n, p in obj.teacher.named_parameters()}
    with torch.no_grad():  # move the student away from the teacher
        for p in obj.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    student = dict(obj.model.named_parameters())
    obj.after_step(0.25)
    m = 1.0 - 0.1 * (math.cos(math.pi * 0.25) + 1) / 2 if schedule == "cosine" else 0.9
    assert obj.momentum_at(0.25) == pytest.approx(m, abs=1e-12)
    for name, p in obj.teacher.named_parameters():
        expected = m * before[name] + (1 - m) * student[name].detach()
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(obj.teacher.cls_token, before["cls_token"])


def test_momentum_schedules():
    assert ema_momentum(0.0, 0.996, 1.0, "cosine") == pytest.approx(0.996)
    assert ema_momentum(0.5, 0.996, 1.0, "cosine") == pytest.approx(0.998)
    assert ema_momentum(1.0, 0.996, 1.0, "cosine") == pytest.approx(1.0)
    values = [ema_momentum(p / 10, 0.996, 1.0, "cosine") for p in range(11)]
    assert values == sorted(values)
    assert {ema_momentum(p, 0.996, 1.0, "constant") for p in (0.0, 0.5, 1.0)} == {0.996}
    with pytest.raises(ValueError, match="teacher.schedule"):
        ema_momentum(0.5, 0.996, 1.0, "linear")


def init_weight_left(num_steps: int, max_window: float, schedule: str = "cosine") -> float:
    """prod_t m_t: the teacher's remaining weight on its initialisation after ``num_steps``."""
    left = 1.0
    for s in range(num_steps):
        left *= ema_momentum((s + 1) / num_steps, 0.996, 1.0, schedule, 1 / num_steps, max_window)
    return left


@pytest.mark.parametrize("num_steps", [10, 234, 2340, 100_000])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_window_cap_forgets_the_init_at_any_run_length(num_steps, schedule):
    assert init_weight_left(num_steps, 0.05, schedule) < 1e-6


def test_paper_momentum_is_kept_where_the_run_is_long_enough():
    # Without the cap a 234-step run keeps most of the init (the problem the cap fixes) ...
    assert init_weight_left(234, 0.0) > 0.6
    # ... and with it a long run follows the paper's 0.996 -> 1 except in its last ~15 %.
    n = 100_000
    for p in (0.0, 0.5, 0.8):
        assert ema_momentum(p, 0.996, 1.0, "cosine", 1 / n, 0.05) == ema_momentum(p, 0.996, 1.0, "cosine")
    assert ema_momentum(1.0, 0.996, 1.0, "cosine", 1 / n, 0.05) == pytest.approx(1 - 20 / n)


def test_short_run_teacher_holds_almost_no_init(make_model, batch):
    """End to end through forward/after_step: the step size comes from the progress values."""
    imgs, noise = batch
    obj = EMATeacher(MAE(make_model(), 0.75), max_window=0.2)
    with torch.no_grad():  # a zero student: the teacher is then exactly (weight on init) * init
        for p in obj.model.parameters():
            p.zero_()
    init = obj.teacher.cls_token.detach().clone()
    num_steps = 12
    for s in range(num_steps):
        obj(imgs, noise, s / num_steps)
        obj.after_step((s + 1) / num_steps)
    left = math.prod(ema_momentum((s + 1) / num_steps, 0.996, 1.0, "cosine", 1 / num_steps, 0.2)
                     for s in range(num_steps))
    torch.testing.assert_close(obj.teacher.cls_token, left * init, rtol=1e-5, atol=1e-8)
    assert left < 0.01 < init_weight_left(num_steps, 0.0)
    with pytest.raises(RuntimeError, match="before forward"):
        EMATeacher(MAE(make_model(), 0.75)).after_step(0.5)


def test_zero_weight_is_mae(make_model, batch):
    imgs, noise = batch
    mae, rc = MAE(make_model(), 0.75), EMATeacher(MAE(make_model(), 0.75), weight=0.0)
    a, b = mae(imgs, noise), rc(imgs, noise)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, rtol=0, atol=1e-6)
    for (name, pa), pb in zip(mae.model.named_parameters(), rc.model.parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=1e-6, msg=name)


def test_consistency_loss_uses_same_or_mirrored_masks(make_model, batch):
    imgs, noise = batch
    obj = EMATeacher(MAE(make_model(), 0.75), weight=1.0)
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = obj(imgs, noise)
    masks = random_masking(noise, 0.75)
    target = obj.teacher(imgs, masks=masks).pred
    torch.testing.assert_close(out.terms["loss_teacher"], masked_mean((out.pred - target) ** 2, masks.mask))
    torch.testing.assert_close(out.loss, out.terms["loss_rec"] + out.terms["loss_teacher"])
    obj.mask = "different"
    out = obj(imgs, noise)
    target = obj.teacher(imgs, masks=random_masking(noise.flip(1), 0.75)).pred
    torch.testing.assert_close(out.terms["loss_teacher"], masked_mean((out.pred - target) ** 2, masks.mask))


def test_teacher_consistency_on_every_emae_part(make_model, batch):
    imgs, noise = batch
    obj = EMATeacher(EMAE(make_model(), 0.75), weight=0.5, mask="same")
    with torch.no_grad():
        for p in obj.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = obj(imgs, noise)
    parts = partition_masking(noise, 4)
    per_part = []
    for k, part in enumerate(parts):
        target = teacher_predict(obj.teacher, imgs, part)
        per_part.append(masked_mean((out.preds[k * 8:(k + 1) * 8] - target) ** 2, part.mask))
    torch.testing.assert_close(out.terms["loss_teacher"], torch.stack(per_part).mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, out.terms["loss_rec"] + out.terms["loss_sc"] + 0.5 * out.terms["loss_teacher"])
    assert mirror_masks(parts[0]).mask.shape == parts[0].mask.shape


def test_eval_weights(make_model):
    obj = EMATeacher(MAE(make_model(), 0.75))
    assert obj.eval_model() is obj.teacher
    assert EMATeacher(MAE(make_model(), 0.75), eval_weights="student").eval_model() is not None
    student = EMATeacher(MAE(make_model(), 0.75), eval_weights="student")
    assert student.eval_model() is student.model
