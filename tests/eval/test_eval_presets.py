import pytest

from mimkit.config import ConfigError, load_config


def test_vit_base_preset_has_the_mae_recipes():
    e = load_config("mae_vit_base_patch16").eval
    f, p = e.finetune, e.linprobe
    assert (f.epochs, f.blr, f.layer_decay, f.drop_path, f.batch_size * f.accum_iter) == (100, 5e-4, 0.65, 0.1, 1024)
    assert (f.mixup, f.cutmix, f.smoothing, f.reprob, f.warmup_epochs) == (0.8, 1.0, 0.1, 0.25, 5)
    assert f.auto_augment == "rand-m9-mstd0.5-inc1" and f.global_pool == "avg"
    assert (p.optimizer, p.batch_size * p.accum_iter, p.blr, p.epochs, p.warmup_epochs) == ("lars", 16384, 0.1, 90, 10)
    assert p.weight_decay == 0.0 and p.feature == "cls" and not p.cached_features


@pytest.mark.parametrize("name", ["fmnist_tiny", "cifar10_tiny"])
def test_small_image_presets(name):
    e = load_config(name).eval
    assert e.linprobe.cached_features and e.finetune.auto_augment is None


def test_eval_values_are_checked():
    with pytest.raises(ConfigError, match="eval.linprobe.optimizer"):
        load_config(None, ["eval.linprobe.optimizer=adam"])
    with pytest.raises(ConfigError, match="eval.finetune.layer_decay"):
        load_config(None, ["eval.finetune.layer_decay=0"])
    with pytest.raises(ConfigError, match="eval.finetune.blrr"):
        load_config(None, ["eval.finetune.blrr=1"])
