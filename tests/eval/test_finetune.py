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


def test_per_epoch_accuracy_is_named_after_the_split_it_reads(make_cfg, tiny_ckpt):
    """Choosing settings on val must not log val accuracy as test accuracy."""
    cfg = make_cfg("data.val_fraction=0.25", "eval.split=val", "eval.finetune.max_steps=null",
                   "eval.finetune.epochs=2", "eval.finetune.eval_every=1")
    out = run_finetune(build_classifier(cfg, 10, tiny_ckpt), cfg, torch.device("cpu"))
    assert out["test_size"] == 30 and "val_top1" in out["history"][0]
    assert not any("test_top1" in row for row in out["history"])


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
