"""Shared fixtures: tiny models and configs that run in well under a second on a CPU."""

from __future__ import annotations

import pytest
import torch

from mimkit.models.mae import build_model

TINY_MODEL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                  decoder_num_heads=2)
TINY_OVERRIDES = [
    "data.name=synthetic", "data.synthetic_size=64", "data.num_workers=0",
    "model.arch=vit_tiny_small_images", "model.img_size=16", "model.in_chans=1",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.decoder_embed_dim=32",
    "model.decoder_depth=1", "model.decoder_num_heads=2",
    "train.batch_size=8", "train.warmup_epochs=1", "train.blr=1e-3", "train.epochs=2",
]


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model("vit_tiny_small_images", img_size=16, in_chans=1, **TINY_MODEL)


@pytest.fixture
def tiny_overrides():
    return list(TINY_OVERRIDES)
