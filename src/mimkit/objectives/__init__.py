"""Pre-training objectives: one module per method, registered by name below.

The contract (:mod:`mimkit.objectives.base`): an :class:`Objective` maps images and masking
noise to an :class:`ObjectiveOutput` (``loss`` and the named ``terms`` the trainer logs), draws
only from the noise (exact resume), and exposes ``after_step``, ``eval_model`` and
``extra_state``. ``method`` in the config names one base, optionally with wrappers added by
``+``. Methods are presets of independent axes (docs/methods/README.md):

=========  ==================  ==========  ===========  ===============================
method     masking             mixing      teacher      auxiliary loss
=========  ==================  ==========  ===========  ===============================
mae        random              none        none         —
emae       K-part partition    none        none         self-consistency (``loss_sc``)
mixedae    K-part partition    r-way       none         homologous contrastive (``loss_hc``,
                                                        ``loss_attn``)
rcmae      (the base's)        (base's)    EMA          teacher consistency (``loss_teacher``)
=========  ==================  ==========  ===========  ===============================

``rcmae`` is a wrapper, so ``rcmae`` alone is MAE plus the teacher, and ``emae+rcmae`` and
``mixedae+rcmae`` are those bases plus an EMA teacher on whatever rows they decoded. Adding a
method: a module, a line in ``BASES`` or ``WRAPPERS``, and, if it has options, a config
section (docs/adding-a-method.md).
"""

from __future__ import annotations

import difflib

from mimkit.config import Config, ConfigError
from mimkit.models.mae import MaskedAutoencoderViT
from mimkit.objectives.base import Objective, ObjectiveOutput, Wrapper
from mimkit.objectives.emae import EMAE
from mimkit.objectives.mae import MAE
from mimkit.objectives.mixedae import MixedAE
from mimkit.objectives.teacher import EMATeacher

__all__ = ["BASES", "EMAE", "MAE", "WRAPPERS", "EMATeacher", "MixedAE", "Objective", "ObjectiveOutput",
           "Wrapper", "build_objective", "parse_method"]

BASES: dict[str, type[Objective]] = {"mae": MAE, "emae": EMAE, "mixedae": MixedAE}
WRAPPERS: dict[str, type[Wrapper]] = {"rcmae": EMATeacher}


def parse_method(method: str) -> tuple[type[Objective], list[type[Wrapper]]]:
    """``'emae+rcmae'`` → ``(EMAE, [EMATeacher])``: one base (``mae`` when only wrappers are
    named) and the wrappers in the order given. Unknown names get a one-line error."""
    names = [p.strip() for p in method.split("+")]
    known = [*BASES, *WRAPPERS]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"method: unknown '{name}'{hint}; choose from {', '.join(known)}, "
                              "or a base plus wrappers such as emae+rcmae")
    bases = [n for n in names if n in BASES]
    if len(bases) > 1:
        raise ConfigError(f"method: '{method}' names {len(bases)} base methods ({', '.join(bases)}); "
                          f"use one of {', '.join(BASES)}, plus any of {', '.join(WRAPPERS)}")
    wrappers = list(dict.fromkeys(n for n in names if n in WRAPPERS))
    return BASES[bases[0] if bases else "mae"], [WRAPPERS[n] for n in wrappers]


def build_objective(cfg: Config, model: MaskedAutoencoderViT) -> Objective:
    """The objective named by ``cfg.method`` around ``model`` (e.g. ``emae+rcmae``)."""
    base_cls, wrapper_classes = parse_method(cfg.method)
    if cfg.decoder.predict_ratio < 1.0 and not base_cls.partial_reconstruction:
        raise ConfigError(
            f"decoder.predict_ratio={cfg.decoder.predict_ratio} is not implemented for method "
            f"'{cfg.method}' (only {', '.join(n for n, c in BASES.items() if c.partial_reconstruction)}, "
            "with or without wrappers); set decoder.predict_ratio=1"
        )
    try:  # shape errors that need the model (K vs L, batch vs r) name their key
        objective = base_cls.from_config(model, cfg)
        for wrapper_cls in wrapper_classes:
            objective = wrapper_cls.from_config(objective, cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return objective
