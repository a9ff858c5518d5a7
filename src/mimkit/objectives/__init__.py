"""Pre-training objectives: one small module per method, composed by :func:`build_objective`."""

from __future__ import annotations

from torch import nn

from mimkit.config import Config, method_parts
from mimkit.models.mae import MaskedAutoencoderViT
from mimkit.objectives.mae import MAE


def build_objective(cfg: Config, model: MaskedAutoencoderViT) -> nn.Module:
    """The objective named by ``cfg.method`` around ``model``."""
    parts = method_parts(cfg.method)
    if parts == {"mae"}:
        return MAE(model, cfg.mask_ratio)
    raise NotImplementedError(f"method '{cfg.method}' is not implemented yet")
