"""Gradient checkpointing (``train.grad_checkpointing``): same gradients, fewer stored activations."""

import torch

from mimkit.bench import SavedTensorMeter
from mimkit.config import load_config
from mimkit.masking import predicted_subset, random_masking
from mimkit.models import model_from_config
from mimkit.models.mae import build_model
from tests.conftest import TINY_OVERRIDES


def _model():
    torch.manual_seed(0)
    return build_model("vit_tiny_small_images", img_size=16, in_chans=1, embed_dim=64, depth=4,
                       num_heads=2, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 16, 16, generator=g), torch.rand(8, 16, generator=g)


def _kept_bytes(model, imgs, noise) -> int:
    """Bytes kept for the backward after a forward: tensors autograd saves plus, under
    checkpointing, each block's input, which the checkpoint holds to recompute the block."""
    meter = SavedTensorMeter([*model.parameters(), *model.buffers(), imgs, noise])
    inputs: dict[int, int] = {}

    def keep_input(module, args):
        if model.grad_checkpointing:
            inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()

    hooks = [b.register_forward_pre_hook(keep_input) for b in [*model.blocks, *model.decoder_blocks]]
    with meter:
        loss = model(imgs, noise=noise).loss
    for h in hooks:
        h.remove()
    loss.backward()
    return meter.bytes + sum(v for k, v in inputs.items() if k not in meter._sizes)


def _grads(model, imgs, noise, ids_pred=None):
    model.zero_grad(set_to_none=True)
    masks = random_masking(noise, 0.75)
    model(imgs, masks=masks, ids_pred=ids_pred).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_gradients_with_and_without_checkpointing():
    model = _model()
    imgs, noise = _batch()
    ids = predicted_subset(noise, random_masking(noise, 0.75), 0.5)
    for ids_pred in (None, ids):  # full and partial decoder
        plain = _grads(model, imgs, noise, ids_pred)
        model.set_grad_checkpointing(True)
        ckpt = _grads(model, imgs, noise, ids_pred)
        model.set_grad_checkpointing(False)
        assert plain.keys() == ckpt.keys() and len(plain) > 10
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)


def test_checkpointing_keeps_far_fewer_activations():
    model = _model()
    imgs, noise = _batch()
    plain = _kept_bytes(model, imgs, noise)
    model.set_grad_checkpointing(True)
    ckpt = _kept_bytes(model, imgs, noise)
    # a block stores ~10 tensors of its width and more; checkpointed, only its input stays
    assert ckpt < 0.3 * plain, (ckpt, plain)


def test_no_checkpointing_without_grad_and_config_switch():
    model = _model()
    model.set_grad_checkpointing(True)
    imgs, noise = _batch()
    with torch.no_grad():  # evaluation: plain blocks, same output
        a = model(imgs, noise=noise).loss
    model.set_grad_checkpointing(False)
    with torch.no_grad():
        assert torch.equal(a, model(imgs, noise=noise).loss)
    cfg = load_config(None, [*TINY_OVERRIDES, "train.grad_checkpointing=true"])
    assert model_from_config(cfg).grad_checkpointing
    assert not model_from_config(load_config(None, TINY_OVERRIDES)).grad_checkpointing
