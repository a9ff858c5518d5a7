"""Composition (docs/methods/README.md): presets from config, combinations, and learning on synthetic data."""

import dataclasses
import inspect

import pytest
import torch

from mimkit.config import ConfigError, MixedAEConfig, TeacherConfig, load_config
from mimkit.models import model_from_config
from mimkit.objectives import EMAE, MAE, EMATeacher, MixedAE, build_objective, parse_method

TINY = ["model.img_size=16", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.name=synthetic", "train.batch_size=8"]


@pytest.mark.parametrize("method,kind,base", [
    ("mae", MAE, None), ("emae", EMAE, None), ("mixedae", MixedAE, None),
    ("rcmae", EMATeacher, MAE), ("emae+rcmae", EMATeacher, EMAE), ("rcmae+mixedae", EMATeacher, MixedAE),
])
def test_presets_and_combinations(method, kind, base):
    cfg = load_config("fmnist_tiny", [f"method={method}", *TINY])
    obj = build_objective(cfg, model_from_config(cfg))
    assert isinstance(obj, kind)
    if base is not None:
        assert isinstance(obj.base, base)
    g = torch.Generator().manual_seed(0)
    out = obj(torch.randn(8, 1, 16, 16, generator=g), torch.rand(8, 16, generator=g), 0.5)
    assert torch.isfinite(out.loss)
    assert out.pred.shape == (8, 16, 16) and out.mask.shape == (8, 16)


def test_method_names_are_checked_where_methods_are_registered():
    assert parse_method("emae+rcmae") == (EMAE, [EMATeacher])
    assert parse_method("rcmae") == (MAE, [EMATeacher])  # wrappers alone wrap MAE
    with pytest.raises(ConfigError, match="did you mean 'emae'"):
        parse_method("emea")
    with pytest.raises(ConfigError, match="names 2 base methods"):  # both use the K-part partition
        parse_method("emae+mixedae")


def test_a_bad_method_fails_before_the_run_folder_gets_a_config(tmp_path):
    from mimkit.engine.trainer import pretrain

    with pytest.raises(ConfigError, match="method: unknown 'emea'"):
        pretrain(load_config(None, ["method=emea", *TINY, "data.num_workers=0"]), tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_invalid_combinations_and_shapes_error():
    cfg = load_config("fmnist_tiny", ["method=emae", "mask_ratio=0.7", *TINY])
    with pytest.raises(ConfigError, match="not an integer"):
        build_objective(cfg, model_from_config(cfg))
    with pytest.raises(ConfigError, match="emae.sc_warmup"):
        load_config("fmnist_tiny", ["emae.sc_warmup=2"])


def _objective(method: str, model):
    if method == "mae":
        return MAE(model, 0.75)
    if method == "emae":
        return EMAE(model, 0.75)
    if method == "mixedae":
        return MixedAE(model, 0.75)
    if method == "rcmae":
        return EMATeacher(MAE(model, 0.75), momentum=0.9)
    return EMATeacher(EMAE(model, 0.75), momentum=0.9)


@pytest.mark.parametrize("method", ["mae", "emae", "mixedae", "rcmae", "emae+rcmae"])
def test_loss_decreases_on_synthetic_data(method, make_model, make_images):
    """A behaviour test: 60 AdamW steps on smooth images must lower the reconstruction loss."""
    torch.manual_seed(0)
    obj = _objective(method, make_model(seed=0))
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=3e-3)
    imgs = make_images(16, seed=0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(60):
        out = obj(imgs, torch.rand(16, 16, generator=g), step / 60)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.after_step((step + 1) / 60)
        losses.append(out.terms["loss_rec"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (method, first, last)


@pytest.mark.parametrize("section,cls,positional", [
    (TeacherConfig, EMATeacher, {"base"}), (MixedAEConfig, MixedAE, {"model", "mask_ratio", "batch_size"}),
])
def test_method_config_keys_are_the_constructor_keywords(section, cls, positional):
    """So that an objective can be built as ``cls(..., **asdict(section))``."""
    keywords = set(inspect.signature(cls.__init__).parameters) - {"self"} - positional
    assert {f.name for f in dataclasses.fields(section)} == keywords
