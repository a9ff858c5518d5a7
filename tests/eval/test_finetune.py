import pytest
import torch

from mimkit.eval.finetune import build_classifier, build_optimizer, finetune_transforms, lr_scales, run_finetune


@pytest.mark.parametrize("depth", [2, 3])
def test_layer_decay_follows_methods(make_cfg, depth):
    cfg = make_cfg(f"model.depth={depth}", "eval.finetune.layer_decay=0.5")
    model = build_classifier(cfg, 10)
    opt = build_optimizer(model, cfg, lr=1e-3)
    scales = lr_scales(opt, model)
    for name, scale in scales.items():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer = depth + 1
        assert scale == pytest.approx(0.5 ** (depth + 1 - layer)), name
    decay = {n: g["weight_decay"] for g in opt.param_groups for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert decay["blocks.0.attn.qkv.weight"] == 0.05
    assert decay["blocks.0.attn.qkv.bias"] == decay["pos_embed"] == decay["cls_token"] == 0.0


def test_classifier_from_checkpoint(tiny_cfg, tmp_path, save_ckpt):
    tiny_ckpt = tmp_path / "ck.pt"
    state = save_ckpt(tiny_ckpt, tiny_cfg, seed=1)["model"]
    model = build_classifier(tiny_cfg, 10, tiny_ckpt)
    assert model.global_pool == "avg" and isinstance(model.norm, torch.nn.Identity)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.fc_norm.weight, torch.ones(32))
    assert abs(model.head.weight.std().item() - 2e-5) < 5e-6 and model.head.bias.abs().sum() == 0
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(tiny_cfg.eval.finetune.drop_path)
    scratch = build_classifier(tiny_cfg, 10)
    assert not torch.equal(scratch.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])


def test_finetune_runs_with_mixup_randaug_erasing(make_cfg, tiny_ckpt):
    cfg = make_cfg("eval.finetune.mixup=0.8", "eval.finetune.cutmix=1.0", "eval.finetune.reprob=0.5",
                   "eval.finetune.auto_augment=rand-m9-mstd0.5-inc1", "eval.finetune.eval_every=1")
    model = build_classifier(cfg, 10, tiny_ckpt)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    out = run_finetune(model, cfg, torch.device("cpu"))
    assert out["steps"] == 2 and 0.0 <= out["value"] <= 1.0 and out["test_size"] == 120
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_learning_curve_reads_val_and_test_is_read_once(make_cfg, tiny_ckpt, monkeypatch, split):
    """The per-epoch curve reads the val split, named so, at every epoch including the last; a
    run that publishes a test number reads the test split once, at the end."""
    import mimkit.eval.finetune as ft

    cfg = make_cfg("data.val_fraction=0.25", f"eval.split={split}", "eval.finetune.max_steps=null",
                   "eval.finetune.epochs=2", "eval.finetune.eval_every=1")
    reads, real = [], ft.confusion_matrix
    monkeypatch.setattr(ft, "confusion_matrix", lambda m, loader, *a: reads.append(len(loader.dataset))
                        or real(m, loader, *a))
    out = run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"))
    assert [sorted(row) for row in out["history"]] == [["epoch", "step", "train_loss", "val_top1"]] * 2
    assert out["test_size"] == (30 if split == "val" else 120)
    assert reads == ([30, 30] if split == "val" else [30, 30, 120])  # val per epoch; test once


def test_transforms_for_gray_small_images(make_cfg):
    from PIL import Image

    cfg = make_cfg("model.in_chans=1", "eval.finetune.auto_augment=rand-m9-mstd0.5-inc1")
    train, test = finetune_transforms(cfg)
    img = Image.new("RGB", (20, 20), (120, 30, 200))
    assert train(img).shape == test(img).shape == (1, 16, 16)


def test_randaugment_posterize_at_full_magnitude(make_cfg):
    # timm's 'inc1' posterize keeps 0 bits at magnitude 10, which Pillow >= 12 refuses.
    from PIL import Image

    cfg = make_cfg("eval.finetune.auto_augment=rand-m10-inc1")
    train, _ = finetune_transforms(cfg)
    ops = [op for t in train.transforms[1].transforms for op in getattr(t, "ops", [])]
    (posterize,) = [op for op in ops if op.name == "PosterizeIncreasing"]
    posterize.prob = 1.0
    out = posterize(Image.new("RGB", (16, 16), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_gradient_accumulation_counts_optimizer_steps(make_cfg, tiny_ckpt):
    cfg = make_cfg("eval.finetune.accum_iter=3", "eval.finetune.max_steps=2", "eval.finetune.batch_size=8")
    out = run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"))
    assert out["steps"] == 2 and out["accum_iter"] == 3
    assert out["lr"] == pytest.approx(cfg.eval.finetune.blr * 24 / 256)


RESUMABLE = ("eval.finetune.max_steps=null", "eval.finetune.epochs=3", "eval.finetune.warmup_epochs=1",
             "eval.finetune.mixup=0.8", "eval.finetune.cutmix=1.0", "eval.finetune.reprob=0.5",
             "eval.finetune.crop_scale=[0.5,1.0]", "eval.finetune.eval_every=1")


def _interrupt_at(monkeypatch, at_step: int, how):
    """Call ``how()`` when fine-tuning reaches optimizer step ``at_step`` (once)."""
    import mimkit.eval.finetune as ft

    real, done = ft.warmup_cosine, []

    def schedule(step, *args):
        if step == at_step and not done:
            done.append(step)
            how()
        return real(step, *args)

    monkeypatch.setattr(ft, "warmup_cosine", schedule)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("workers", [0, 2])
def test_finetune_stopped_by_a_signal_resumes_exactly(make_cfg, tiny_ckpt, tmp_path, monkeypatch, workers):
    """SIGTERM mid-epoch saves the progress; the same call again ends with the weights and history
    of an uninterrupted run (drop path, mixup, crops and erasing all random)."""
    import os
    import signal

    from mimkit.engine.signals import Preempted

    monkeypatch.setattr("mimkit.eval.finetune.SAVE_EVERY_S", 0.0)
    cfg = make_cfg(*RESUMABLE, f"data.num_workers={workers}")
    straight = build_classifier(cfg, 10, tiny_ckpt)
    ref = run_finetune(straight, cfg, torch.device("cpu"))
    per_epoch = ref["steps"] // 3
    state = tmp_path / "ft.state.pt"

    _interrupt_at(monkeypatch, per_epoch + 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Preempted, match="same settings and state_path to continue"):
        run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"), state, source="a")
    assert state.is_file()
    resumed = build_classifier(cfg, 10, tiny_ckpt)
    out = run_finetune(resumed, cfg, torch.device("cpu"), state, source="a")
    assert out["value"] == ref["value"] and out["history"] == ref["history"]
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the finished run stays saved until the caller has stored its result: a call now only evaluates
    _interrupt_at(monkeypatch, 0, lambda: pytest.fail("a finished run trained again"))
    again = run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"), state, source="a")
    assert again["value"] == ref["value"] and again["history"] == ref["history"]


def test_finetune_worker_killed_by_the_groups_sigterm_is_a_stop(make_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """A SIGTERM to the whole process group can kill a loader worker that an epoch has just started
    (before it ignores stop signals): that death is the stop, so progress is saved and resumes exactly."""
    import os
    import signal

    import mimkit.data.sampler as sampler
    from mimkit.engine.signals import Preempted

    monkeypatch.setattr("mimkit.eval.finetune.SAVE_EVERY_S", 0.0)
    cfg = make_cfg(*RESUMABLE)
    straight = build_classifier(cfg, 10, tiny_ckpt)
    ref = run_finetune(straight, cfg, torch.device("cpu"))
    real, dead = sampler.step_loaders, []

    def dying_loaders(*args, **kwargs):  # the loader raises as torch does when a worker was killed
        steps = real(*args, **kwargs)

        def one(loader):
            while True:
                if dead:
                    raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
                yield next(loader)

        try:
            for loader in steps:
                yield one(loader)
        finally:
            steps.close()

    monkeypatch.setattr(sampler, "step_loaders", dying_loaders)
    _interrupt_at(monkeypatch, ref["steps"] // 3 + 2, lambda: (os.kill(os.getpid(), signal.SIGTERM), dead.append(1)))
    state = tmp_path / "ft.state.pt"
    with pytest.raises(Preempted):
        run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"), state, source="a")
    monkeypatch.setattr(sampler, "step_loaders", real)
    resumed = build_classifier(cfg, 10, tiny_ckpt)
    out = run_finetune(resumed, cfg, torch.device("cpu"), state, source="a")
    assert out["value"] == ref["value"] and out["history"] == ref["history"]
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_killed_mid_epoch_resumes_from_its_last_epoch(make_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """A kill between saves (here an exception, like kill -9) loses only the unfinished epoch."""
    monkeypatch.setattr("mimkit.eval.finetune.SAVE_EVERY_S", 0.0)
    cfg = make_cfg(*RESUMABLE)
    straight = build_classifier(cfg, 10, tiny_ckpt)
    ref = run_finetune(straight, cfg, torch.device("cpu"))
    per_epoch = ref["steps"] // 3
    state = tmp_path / "ft.state.pt"

    def crash():
        raise SystemExit("killed")

    _interrupt_at(monkeypatch, 2 * per_epoch + 1, crash)
    with pytest.raises(SystemExit):
        run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"), state)
    resumed = build_classifier(cfg, 10, tiny_ckpt)
    out = run_finetune(resumed, cfg, torch.device("cpu"), state)
    assert out["history"] == ref["history"] and out["value"] == ref["value"]
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_progress_of_another_run_is_refused(make_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """Saved progress continues only the run it came from: same settings, same encoder."""
    from mimkit.errors import RunError

    def crash():
        raise SystemExit("killed")

    cfg = make_cfg(*RESUMABLE)
    state = tmp_path / "ft.state.pt"
    monkeypatch.setattr("mimkit.eval.finetune.SAVE_EVERY_S", 0.0)
    _interrupt_at(monkeypatch, 1, crash)
    with pytest.raises(SystemExit):
        run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"), state, source="a")
    assert not state.exists()  # no epoch finished: nothing saved
    monkeypatch.undo()
    monkeypatch.setattr("mimkit.eval.finetune.SAVE_EVERY_S", 0.0)
    per_epoch = 108 // 16  # 120 synthetic images, 10 % held out as val
    _interrupt_at(monkeypatch, per_epoch + 1, crash)
    with pytest.raises(SystemExit):
        run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"), state, source="a")
    assert state.is_file()
    other = make_cfg(*RESUMABLE, "eval.finetune.blr=0.1")
    for c, source in ((other, "a"), (cfg, "b")):
        with pytest.raises(RunError, match="delete it to start this one"):
            run_finetune(build_classifier(c, 10, tiny_ckpt), c, torch.device("cpu"), state, source=source)


def test_accumulation_larger_than_the_labelled_set_names_the_fix(make_cfg, tiny_ckpt):
    from mimkit.config import ConfigError

    cfg = make_cfg("eval.finetune.accum_iter=8", "eval.finetune.batch_size=16")  # 120 images: 7 batches
    with pytest.raises(ConfigError, match="eval.finetune.accum_iter=8 needs 8 batches"):
        run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"))


def test_per_class_reads_the_confusion_matrix():
    """Rows are true classes, columns predictions; the worst confusions come first."""
    from mimkit.eval.finetune import per_class

    counts = torch.tensor([[8, 2, 0], [0, 5, 5], [1, 0, 9]])
    out = per_class(counts, ["shirt", "coat", "bag"], top=2)
    assert out["per_class_top1"] == {"shirt": 0.8, "coat": 0.5, "bag": 0.9}
    assert out["top_confusions"] == [
        {"true": "coat", "predicted": "bag", "count": 5, "share_of_true": 0.5},
        {"true": "shirt", "predicted": "coat", "count": 2, "share_of_true": 0.2}]


def test_confusion_matrix_counts_predictions():
    from mimkit.eval.finetune import confusion_matrix, evaluate_classifier

    class Fixed(torch.nn.Module):  # predicts the image's first pixel as the class
        num_classes = 3

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 3).float()

    x, y = torch.tensor([[0.0], [1.0], [1.0], [2.0]]), torch.tensor([0, 1, 2, 2])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    counts = confusion_matrix(Fixed(), loader, torch.device("cpu"), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert evaluate_classifier(Fixed(), loader, torch.device("cpu")) == 0.75
