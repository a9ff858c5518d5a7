"""EMA teacher: RC-MAE's teacher consistency added to any base objective (docs/methods/rcmae.md).

The wrapper does not know the base method: it reads the rows the base decoded (``preds``,
``masks``, ``rows`` in the base's output dict), re-runs a frozen EMA copy of the MAE on the
same images with the same masks, and adds ``γ·MSE(student, sg(teacher))`` on the masked
patches. So ``mae + teacher`` is RC-MAE and ``emae + teacher`` is EMAE with an EMA teacher on
every part, without new code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mimkit.config import EmaSchedule, EvalWeights, TeacherMask, choices
from mimkit.engine.schedule import cosine_increase
from mimkit.masking import Masks, gather_tokens, mirror_masks
from mimkit.models.mae import MaskedAutoencoderViT, masked_mean
from mimkit.objectives.base import Objective, ObjectiveOutput, Wrapper

SCHEDULES, TEACHER_MASKS, EVAL_WEIGHTS = choices(EmaSchedule), choices(TeacherMask), choices(EvalWeights)


def ema_momentum(progress: float, start: float, end: float = 1.0, schedule: str = "cosine",
                 step: float = 0.0, max_window: float = 0.0) -> float:
    """Teacher momentum at ``progress`` ∈ [0, 1] for an optimizer step of ``step`` progress (1/N).

    ``cosine``: DINO's ``m = end - (end - start)·(cos(π·progress) + 1)/2``, the RC-MAE paper's
    intent (0.996 → 1). ``constant``: ``start`` throughout, which is what the released RC-MAE
    code effectively does (docs/methods/rcmae.md). ``max_window`` > 0 caps the EMA window
    ``1/(1-m)`` at that fraction of the run, ``m ≤ 1 - step/max_window``: the teacher then
    forgets its initialisation (weight ≈ exp(-1/max_window)) however short the run, while runs
    long enough for the schedule's own window are unchanged until near its end.
    """
    if schedule == "cosine":
        m = cosine_increase(progress, 1.0, start, end)
    elif schedule == "constant":
        m = start
    else:
        raise ValueError(f"teacher.schedule: unknown '{schedule}'; choose from {', '.join(SCHEDULES)}")
    if max_window > 0 and step > 0:
        m = min(m, max(0.0, 1.0 - step / max_window))
    return m


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``ξ ← m·ξ + (1-m)·θ`` over parameters (buffers are left alone), in place."""
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def teacher_predict(teacher: MaskedAutoencoderViT, imgs: torch.Tensor, masks: Masks) -> torch.Tensor:
    """The teacher's prediction of every patch (R, L, p·p·C) for the images' rows and masks."""
    tokens = gather_tokens(teacher.embed(imgs), masks.ids_keep)
    return teacher.forward_decoder(teacher.encode_tokens(tokens), masks.ids_restore)


class EMATeacher(Wrapper):
    """Any base objective + an EMA teacher and its consistency loss ``loss_teacher``.

    ``teacher`` is a frozen copy of the base's MAE (encoder and decoder), kept in eval mode and
    updated after each optimizer step by :meth:`after_step`. ``model`` is the base's student.
    """

    section = "teacher"

    def __init__(
        self,
        base: Objective,
        weight: float = 1.0,
        momentum: float = 0.996,
        momentum_end: float = 1.0,
        schedule: str = "cosine",
        mask: str = "same",
        eval_weights: str = "teacher",
        max_window: float = 0.05,
    ) -> None:
        super().__init__(base)
        for name, value, allowed in (("schedule", schedule, SCHEDULES), ("mask", mask, TEACHER_MASKS),
                                     ("eval_weights", eval_weights, EVAL_WEIGHTS)):
            if value not in allowed:
                raise ValueError(f"teacher.{name}: unknown '{value}'; choose from {', '.join(allowed)}")
        self.teacher = copy.deepcopy(base.model).requires_grad_(False).eval()
        self.weight, self.momentum, self.momentum_end = weight, momentum, momentum_end
        self.schedule, self.mask, self.eval_weights = schedule, mask, eval_weights
        if max_window < 0:
            raise ValueError(f"teacher.max_window: must be >= 0 (0: no cap), got {max_window}")
        self.max_window = max_window
        self._step_progress: float | None = None  # progress seen by the current step's forward

    def train(self, mode: bool = True) -> EMATeacher:
        """Train the base; the teacher always stays in eval mode (docs/methods/rcmae.md)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> ObjectiveOutput:
        # after_step's progress minus this is one optimizer step (1/N) with no step count
        # passed in, and it survives resume (both come from the trainer's step counter).
        self._step_progress = progress
        out = self.base(imgs, noise, progress)
        masks: Masks = out.masks
        # The teacher sees the same masks by default; "different" mirrors them, a pure function
        # of the same noise so that resume stays exact (docs/methods/rcmae.md, masking.mirror_masks).
        teacher_masks = mirror_masks(masks) if self.mask == "different" else masks
        target = teacher_predict(self.teacher, imgs[out.rows], teacher_masks)
        # The teacher's raw prediction is the target (already in norm-pix space), on the
        # student's masked patches with MAE's masked mean (docs/methods/rcmae.md).
        loss_teacher = masked_mean((out.preds - target) ** 2, masks.mask)
        out.loss = out.loss + self.weight * loss_teacher
        out.terms["loss_teacher"] = loss_teacher
        return out

    def momentum_at(self, progress: float, step: float = 0.0) -> float:
        """Momentum after an optimizer step ending at ``progress`` of ``step`` progress (1/N)."""
        return ema_momentum(progress, self.momentum, self.momentum_end, self.schedule, step, self.max_window)

    def after_step(self, progress: float) -> None:
        """EMA update once per optimizer step, with the momentum at the post-step progress.

        The step's size is ``progress`` minus the progress its forward saw; the window cap
        needs it, so with ``max_window`` > 0 a step must run forward first.
        """
        self.base.after_step(progress)
        if self._step_progress is None:
            if self.max_window > 0:
                raise RuntimeError("EMATeacher.after_step before forward: the step size is unknown")
            step = 0.0
        else:
            step = progress - self._step_progress
        ema_update_(self.teacher, self.model, self.momentum_at(progress, step))

    def eval_model(self) -> MaskedAutoencoderViT:
        """The teacher by default (RC-MAE evaluates the teacher), else the student."""
        return self.teacher if self.eval_weights == "teacher" else self.model

    def extra_state(self) -> dict[str, nn.Module]:
        """Both views, so either can be evaluated from the checkpoint (docs/methods/rcmae.md)."""
        return {**self.base.extra_state(), "student": self.model, "teacher": self.teacher}

    def step_cost(self) -> float:
        return self.base.step_cost() + 1 / 3  # a teacher forward, about a third of forward + backward
