"""Official MAE checkpoints (``{'model': state_dict}``) and architecture inference from shapes."""

from __future__ import annotations

import logging
import math
import re

import torch

from mimkit.models.mae import DECODER_DEFAULTS, MaskedAutoencoderViT
from mimkit.models.vit import resize_pos_embed, sincos_2d

log = logging.getLogger("mimkit")
# Widths whose official head count breaks the D/64 rule (ViT-H/14: 1280-d, 16 heads).
KNOWN_HEADS = {1280: 16}


def _count_blocks(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def infer_arch(state: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of :class:`MaskedAutoencoderViT` read off tensor shapes.

    Heads are not stored: encoder ``D/64`` (ViT-H: 16), decoder ``D_dec/32`` (official: 512/16).
    """
    w = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    if "pos_embed" in state:
        n = state["pos_embed"].shape[1] - 1
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch rows, not a square grid; pass img_size=")
        img_size = side * patch
    else:
        img_size = 224
    arch = dict(
        img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
        depth=_count_blocks(state, "blocks"),
        num_heads=KNOWN_HEADS.get(embed_dim, max(embed_dim // 64, 1)),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
    )
    if "decoder_embed.weight" in state:
        dec = state["decoder_embed.weight"].shape[0]
        arch.update(decoder_embed_dim=dec, decoder_depth=_count_blocks(state, "decoder_blocks"),
                    decoder_num_heads=max(dec // 32, 1))
    else:
        arch.update({k: v for k, v in DECODER_DEFAULTS.items() if k != "mlp_ratio"})
    return arch


def is_encoder_only(state: dict) -> bool:
    return "decoder_embed.weight" not in state


def fit_position_tables(state: dict[str, torch.Tensor], model: MaskedAutoencoderViT) -> dict:
    """``state`` (a copy) with its fixed position tables fitted to ``model``'s patch grid: resized
    (bicubic) when the grid differs, rebuilt (sin-cos) when absent (an encoder-only state keeps no
    decoder table)."""
    state = dict(state)
    for name in ("pos_embed", "decoder_pos_embed"):
        target = getattr(model, name)
        if name in state and state[name].shape != target.shape:
            old = math.isqrt(state[name].shape[1] - 1)
            state[name] = resize_pos_embed(state[name], (old, old), model.grid)
        elif name not in state and not (name == "decoder_pos_embed" and is_encoder_only(state)):
            state[name] = sincos_2d(target.shape[-1], model.grid)
    return state


def model_from_state(state: dict[str, torch.Tensor], arch: dict | None = None,
                     norm_pix_loss: bool = True, **overrides) -> MaskedAutoencoderViT:
    """Build an MAE for ``state`` (full or encoder-only) and load it; shapes decide the arch."""
    kwargs = dict(arch or infer_arch(state))
    kwargs["norm_pix_loss"] = norm_pix_loss
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    model = MaskedAutoencoderViT(**kwargs)
    state = fit_position_tables(state, model)
    if is_encoder_only(state):
        missing, unexpected = model.load_state_dict(state, strict=False)
        enc_missing = [k for k in missing if not k.startswith(("decoder", "mask_token"))]
        if enc_missing or unexpected:
            raise ValueError(f"checkpoint does not fit the encoder: missing {enc_missing}, "
                             f"unexpected {unexpected}")
        log.warning("encoder-only checkpoint: the decoder is randomly initialised")
    else:
        model.load_state_dict(state, strict=True)
    return model


def to_official(model: MaskedAutoencoderViT, encoder_only: bool = False) -> dict:
    """``{'model': state_dict}`` as the official release stores it."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if encoder_only:
        state = {k: v for k, v in state.items()
                 if not k.startswith(("decoder", "mask_token"))}
    return {"model": state}
