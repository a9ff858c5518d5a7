import torch

from mimkit.config import LinprobeConfig
from mimkit.eval.linprobe import LinearProbe, build_optimizer, head_accuracy, run_linprobe, train_head_on_features
from mimkit.models import model_from_config


def clusters(n: int, seed: int, dim: int = 32, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, dim, generator=g), labels


def test_probe_learns_a_separable_task_and_not_shuffled_labels():
    p = LinprobeConfig(epochs=30, batch_size=64, warmup_epochs=2)
    x, y = clusters(600, 0)
    xt, yt = clusters(400, 1)
    head, _ = train_head_on_features(x, y, 10, p, seed=0)
    assert head_accuracy(head, xt, yt) > 0.95
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    head, _ = train_head_on_features(x, shuffled, 10, p, seed=0)
    assert head_accuracy(head, xt, yt) < 0.25  # chance is 0.1


def test_head_is_mae_style():
    head = LinearProbe(64, 10)
    assert not head.norm.affine and head.norm.eps == 1e-6
    assert abs(head.fc.weight.std().item() - 0.01) < 0.002 and head.fc.bias.abs().sum() == 0


def test_lars_matches_mae_rule():
    # MAE LARS: weights get g * (0.001 |w| / |g|), biases plain g; momentum 0.9, no weight decay.
    torch.manual_seed(0)
    head = LinearProbe(8, 3)
    head.fc.bias.data.normal_()
    w0, b0 = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    opt = build_optimizer(head, "lars", lr=0.5)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(head(x), y).backward()
    gw, gb = head.fc.weight.grad.clone(), head.fc.bias.grad.clone()
    opt.step()
    expect_w = w0 - 0.5 * gw * (0.001 * w0.norm() / gw.norm())
    torch.testing.assert_close(head.fc.weight.detach(), expect_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.fc.bias.detach(), b0 - 0.5 * gb)


def test_run_linprobe_cached_and_online(make_cfg):
    for cached in (True, False):
        cfg = make_cfg(f"eval.linprobe.cached_features={cached}", "eval.linprobe.epochs=2",
                       "eval.linprobe.optimizer=lars", "data.label_fraction=0.5")
        out = run_linprobe(model_from_config(cfg), cfg, torch.device("cpu"))
        assert out["train_size"] == 60 and out["test_size"] == 120 and 0.0 <= out["value"] <= 1.0
        assert out["cached_features"] is cached and out["steps"] == 2
