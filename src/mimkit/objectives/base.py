"""The objective contract: what the trainer, the evaluations and the wrappers rely on.

An objective is an ``nn.Module`` that turns a batch of images and its masking noise into an
:class:`ObjectiveOutput`. It owns the MAE it trains (``model``) and any extra modules (heads,
an EMA teacher). Everything it draws comes from ``noise``, never from the global RNG, so a run
resumed from a checkpoint computes exactly what the uninterrupted run would have.

A method is either a **base** (:class:`Objective`: it masks, encodes, decodes and scores) or a
**wrapper** (:class:`Wrapper`: it adds a term to any base, using the rows the base decoded).
Both are registered by name in :mod:`mimkit.objectives` and built from the config by
:meth:`Objective.from_config`. docs/adding-a-method.md walks through adding one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mimkit.masking import Masks
from mimkit.models.mae import MaskedAutoencoderViT


@dataclass
class ObjectiveOutput:
    """One forward pass of an objective.

    ``loss`` is what backward runs on. ``terms`` are the named scalars the trainer logs each step
    (``loss_<name>`` for loss terms, ``acc_<name>`` for accuracies); they are not added to ``loss``
    by anyone but the objective. ``pred``/``mask`` (B, L, ·) are one reconstruction per image, for
    pictures. ``preds``/``masks``/``rows`` are every row the base decoded, (R, L, p·p·C), their
    :class:`~mimkit.masking.Masks` (marking the scored patches) and the batch index of each row's
    image: what a :class:`Wrapper` needs to add a term without knowing the method.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    pred: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    preds: torch.Tensor | None = None
    masks: Masks | None = None
    rows: torch.Tensor | None = None


def section_kwargs(cfg: Any, section: str | None) -> dict:
    """The fields of config section ``section`` as keyword arguments (none for ``None``)."""
    return dataclasses.asdict(getattr(cfg, section)) if section else {}


class Objective(nn.Module):
    """A base method. Subclasses set ``model`` in ``__init__(model, mask_ratio, **options)`` and
    implement :meth:`forward`; the rest has defaults.

    ``section`` names the config section whose fields are the constructor's keyword options
    (``emae`` → ``cfg.emae``); ``None``: no options. ``partial_reconstruction`` says whether the
    method honours ``decoder.predict_ratio``.
    """

    section: ClassVar[str | None] = None
    partial_reconstruction: ClassVar[bool] = False
    model: MaskedAutoencoderViT

    @classmethod
    def from_config(cls, model: MaskedAutoencoderViT, cfg: Any) -> Objective:
        """``cls(model, cfg.mask_ratio, **cfg.<section>)``; override to read other keys."""
        return cls(model, cfg.mask_ratio, **section_kwargs(cfg, cls.section))

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> ObjectiveOutput:
        """Loss and terms for images (B, C, H, W) and masking noise (B, L); ``progress`` ∈ [0, 1)
        is the share of training done (for warm-ups inside the objective)."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with the progress reached (EMA updates go here)."""

    def eval_model(self) -> MaskedAutoencoderViT:
        """The weights evaluation and export use."""
        return self.model

    def extra_state(self) -> dict[str, nn.Module]:
        """Modules whose weights checkpoints also save under their own name, besides ``model``
        (the evaluated weights) and the whole objective (for resuming)."""
        return {}

    def step_cost(self) -> float:
        """A step's rough compute relative to MAE's (for the run summary's time estimate)."""
        return 1.0


class Wrapper(Objective):
    """A method added on top of any base (``base``): ``method: emae+rcmae`` is EMAE wrapped in
    RC-MAE's teacher. Built by ``cls(base, **cfg.<section>)``; the student is the base's model."""

    def __init__(self, base: Objective) -> None:
        super().__init__()
        self.base = base

    @classmethod
    def from_config(cls, base: Objective, cfg: Any) -> Wrapper:  # type: ignore[override]
        """``cls(base, **cfg.<section>)``: a wrapper is built around the base, not the model."""
        return cls(base, **section_kwargs(cfg, cls.section))

    @property
    def model(self) -> MaskedAutoencoderViT:  # type: ignore[override]
        """The student: the base's model (registered once, under ``base``)."""
        return self.base.model

    def after_step(self, progress: float) -> None:
        self.base.after_step(progress)

    def extra_state(self) -> dict[str, nn.Module]:
        return self.base.extra_state()

    def step_cost(self) -> float:
        return self.base.step_cost()
