"""Pre-training objectives: one small module per method, composed by :func:`build_objective`.

The contract the trainer relies on: an objective is an ``nn.Module`` with
``forward(imgs, noise, progress) -> dict`` (``loss`` plus every named term ``loss_*``/``acc_*``,
``pred``/``mask`` for pictures, and ``preds``/``masks``/``rows`` for wrappers), derived only
from ``noise`` (no global RNG: exact resume); ``after_step(progress)`` after each optimizer
step; ``eval_model()``; ``model`` (the student) and, if any, a frozen ``teacher``.

Methods are presets of independent axes (docs/methods/README.md):

=========  ==================  ==========  ===========  ===============================
method     masking             mixing      teacher      auxiliary loss
=========  ==================  ==========  ===========  ===============================
mae        random              none        none         —
emae       K-part partition    none        none         self-consistency (``loss_sc``)
mixedae    K-part partition    r-way       none         homologous contrastive (``loss_hc``,
                                                        ``loss_attn``)
rcmae      (the base's)        (base's)    EMA          teacher consistency (``loss_teacher``)
=========  ==================  ==========  ===========  ===============================

The first three are base objectives; ``rcmae`` is a wrapper, so ``emae+rcmae`` and
``mixedae+rcmae`` are the base plus an EMA teacher on whatever rows the base decoded.
"""

from __future__ import annotations

from torch import nn

from mimkit.config import Config, ConfigError, method_parts
from mimkit.models.mae import MaskedAutoencoderViT
from mimkit.objectives.emae import EMAE
from mimkit.objectives.mae import MAE
from mimkit.objectives.mixedae import MixedAE
from mimkit.objectives.teacher import EMATeacher

__all__ = ["EMAE", "MAE", "EMATeacher", "MixedAE", "build_objective"]


def build_objective(cfg: Config, model: MaskedAutoencoderViT) -> nn.Module:
    """The objective named by ``cfg.method`` around ``model`` (e.g. ``emae+rcmae``)."""
    parts = method_parts(cfg.method)
    if {"emae", "mixedae"} <= parts:
        raise ConfigError(f"method: '{cfg.method}' is not supported (EMAE parts and MixedAE sources "
                          "both use the K-part partition); combine either with rcmae")
    try:
        if "emae" in parts:
            e = cfg.emae
            objective: nn.Module = EMAE(
                model, cfg.mask_ratio, num_parts=e.num_parts, sc_weight=e.sc_weight,
                sc_warmup=e.sc_warmup, sc_distance=e.sc_distance, sc_target=e.sc_target,
                sequential=e.sequential,
            )
        elif "mixedae" in parts:
            m = cfg.mixedae
            objective = MixedAE(
                model, cfg.mask_ratio, ways=m.ways, attn_blocks=m.attn_blocks, topk=m.topk,
                oracle=m.oracle, hc_weight=m.hc_weight, attn_weight=m.attn_weight,
                hc_temperature=m.hc_temperature, hc_proj_dim=m.hc_proj_dim, hc_prototype=m.hc_prototype,
                segment_embed=m.segment_embed, batch_size=cfg.train.batch_size,
            )
        else:
            objective = MAE(model, cfg.mask_ratio, predict_ratio=cfg.decoder.predict_ratio)
    except ValueError as e:  # shape errors that need the model (K vs L, batch vs r) name their key
        raise ConfigError(str(e)) from None
    if "rcmae" in parts:
        t = cfg.teacher
        objective = EMATeacher(
            objective, weight=t.weight, momentum=t.momentum, momentum_end=t.momentum_end,
            schedule=t.schedule, mask=t.mask, eval_weights=t.eval_weights, max_window=t.max_window,
        )
    return objective
