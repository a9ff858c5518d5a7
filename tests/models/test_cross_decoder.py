"""CrossMAE-style decoder (``decoder.kind=cross``): mask queries attend to visible tokens only."""

import pytest
import torch

from mimkit.config import ConfigError, load_config
from mimkit.interop.hf import hf_config_kwargs
from mimkit.interop.official import model_from_state
from mimkit.masking import predicted_subset, random_masking
from mimkit.models import model_from_config
from mimkit.models.mae import build_model
from mimkit.models.vit import CrossBlock
from mimkit.objectives import build_objective
from tests.conftest import TINY_OVERRIDES


def _model():
    torch.manual_seed(0)
    return build_model("vit_tiny_small_images", img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                       decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2, decoder_kind="cross")


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 16, 16, generator=g), torch.rand(4, 16, generator=g)


def _rows(x, ids):
    return x.gather(1, ids[..., None].expand(-1, -1, x.shape[-1]))


def test_each_patch_prediction_is_independent_of_the_other_queries():
    model = _model()
    assert all(isinstance(b, CrossBlock) for b in model.decoder_blocks)
    imgs, noise = _batch()
    masks = random_masking(noise, 0.75)
    full = model(imgs, masks=masks)  # a query for every patch
    assert full.pred.shape == (4, 16, 16)
    ids = predicted_subset(noise, masks, 0.25)
    part = model(imgs, masks=masks, ids_pred=ids)
    # (with MAE's self-attention decoder the other queries change every prediction)
    torch.testing.assert_close(_rows(part.pred, ids), _rows(full.pred, ids), rtol=1e-5, atol=1e-5)


def test_cross_decoder_from_config_trains_checkpoints_and_is_refused_by_hf_export():
    cfg = load_config(None, [*TINY_OVERRIDES, "decoder.kind=cross", "decoder.predict_ratio=0.25",
                             "train.grad_checkpointing=true"])
    model = model_from_config(cfg)
    assert model.arch["decoder_kind"] == "cross" and "decoder_kind" not in _plain_arch()
    imgs, noise = _batch()
    out = build_objective(cfg, model)(imgs.repeat(2, 1, 1, 1), noise.repeat(2, 1))
    out.loss.backward()
    assert all(p.grad is not None for p in model.decoder_blocks.parameters())
    # a checkpoint's arch rebuilds the same model
    again = model_from_state(model.state_dict(), model.arch)
    assert torch.equal(again(imgs, noise=noise).loss, model(imgs, noise=noise).loss)
    with pytest.raises(ValueError, match="cross"):
        hf_config_kwargs(model)
    with pytest.raises(ConfigError, match="decoder.kind"):
        load_config(None, [*TINY_OVERRIDES, "decoder.kind=crossed"])


def _plain_arch():
    return model_from_config(load_config(None, TINY_OVERRIDES)).arch


def test_cross_decoder_same_gradients_with_checkpointing():
    model = _model()
    imgs, noise = _batch()
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        model(imgs, noise=noise).loss.backward()
        grads.append([p.grad.clone() for p in model.decoder_blocks.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["emae", "mixedae", "rcmae"])
def test_cross_decoder_serves_every_method(method):
    cfg = load_config(None, [*TINY_OVERRIDES, f"method={method}", "decoder.kind=cross"])
    objective = build_objective(cfg, model_from_config(cfg))
    g = torch.Generator().manual_seed(0)
    out = objective(torch.randn(8, 1, 16, 16, generator=g), torch.rand(8, 16, generator=g), 0.5)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.pred.shape == (8, 16, 16)
