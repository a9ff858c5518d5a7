"""Learning rates and per-iteration schedules: the linear scaling rule, linear warm-up then a
half-cycle cosine (the MAE recipe, docs/methods/mae.md)."""

from __future__ import annotations

import math


def scaled_lr(lr: float | None, blr: float, effective_batch: int) -> float:
    """``lr`` if given, else the linear scaling rule ``blr * effective_batch / 256`` (MAE, Goyal et al.)."""
    return lr if lr is not None else blr * effective_batch / 256


def warmup_cosine(step: float, total: float, warmup: float, base: float, final: float = 0.0) -> float:
    """Value at ``step`` (fractional allowed) of a warm-up + cosine schedule from ``base`` to ``final``."""
    if step < warmup:
        return base * step / warmup
    span = max(total - warmup, 1e-12)
    progress = min((step - warmup) / span, 1.0)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_increase(step: float, total: float, start: float, end: float = 1.0) -> float:
    """DINO-style momentum: ``end - (end - start)·(cos(π·step/total) + 1)/2``."""
    progress = min(step / max(total, 1e-12), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0
