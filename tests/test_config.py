import pytest

from mimkit.config import ConfigError, load_config, parse_override, preset_names


def test_presets_load():
    assert {"fmnist_tiny", "mae_vit_base_patch16"} <= set(preset_names())
    base = load_config("mae_vit_base_patch16")
    assert base.model.arch == "vit_base_patch16" and base.train.blr == 1.5e-4
    assert base.train.batch_size * base.train.accum_iter * 8 == 4096  # 8 GPUs
    tiny = load_config("fmnist_tiny", ["train.max_steps=40", "model.depth=3", "train.betas=[0.9,0.99]"])
    assert tiny.train.max_steps == 40 and tiny.model.depth == 3 and tiny.train.betas == [0.9, 0.99]


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown config key 'train.epoch'; did you mean 'train.epochs'"),
    ("trian.epochs=3", "did you mean 'train'"),
    ("train.epochs=abc", "train.epochs: expected int"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("model.img_size=30", "model.img_size: 30 is not divisible by the patch size 4"),
    ("mask_ratio=1.5", "mask_ratio"),
    ("train.amp=fp8", "train.amp: 'fp8' is not one of"),
    ("model.arch=vit_bas_patch16", "did you mean 'vit_base_patch16'"),
    ("norm_pix_loss=maybe", "norm_pix_loss: expected bool"),
    ("train", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config("fmnist_tiny", [override])


def test_yaml_file_with_base(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: fmnist_tiny\ntrain:\n  epochs: 3\n")
    cfg = load_config(f)
    assert cfg.train.epochs == 3 and cfg.data.name == "fashion_mnist"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(bad)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean 'fmnist_tiny'"):
        load_config("fmnist_tiny2")


def test_parse_override_types():
    assert load_config("fmnist_tiny", ["train.blr=1e-3"]).train.blr == 1e-3
    assert parse_override("x=null") == {"x": None}
