"""Tiny models and data shared by the objective tests (fast on 2 CPU cores)."""

from __future__ import annotations

import math

import pytest
import torch

from mimkit.models.mae import MaskedAutoencoderViT, build_model


def tiny_model(seed: int = 0, **overrides) -> MaskedAutoencoderViT:
    """A 16 px, 1-channel MAE with 4 px patches (L = 16), 32-d, 2 encoder blocks."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=16, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    kwargs.update(overrides)
    return build_model("vit_tiny_small_images", **kwargs)


def smooth_images(batch: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """Low-frequency images (random sums of sinusoids): structured enough to be learnable."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    imgs = torch.zeros(batch, 1, size, size)
    for _ in range(3):
        fx, fy = torch.rand(2, batch, 1, 1, generator=g) * 2
        phase = torch.rand(batch, 1, 1, generator=g) * 2 * math.pi
        imgs[:, 0] += torch.sin(2 * math.pi * (fx * xs + fy * ys) / size + phase)
    return imgs


@pytest.fixture(autouse=True)
def _objectives_on_one_thread(one_thread):
    """Every objective test runs on one thread (see tests/conftest.py)."""


@pytest.fixture
def make_model():
    return tiny_model


@pytest.fixture
def make_images():
    return smooth_images


@pytest.fixture
def batch():
    """8 images and their masking noise, fixed."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 16, 16, generator=g), torch.rand(8, 16, generator=g)
