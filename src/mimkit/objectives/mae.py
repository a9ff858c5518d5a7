"""Plain MAE (He et al., 2021): one random mask per image, reconstruction of masked patches."""

from __future__ import annotations

import torch
from torch import nn

from mimkit.masking import random_masking
from mimkit.models.mae import MaskedAutoencoderViT


class MAE(nn.Module):
    """The base objective. Every method returns a dict with ``loss`` and its named parts.

    Besides ``pred``/``mask`` (for pictures) a base method exposes what it reconstructed, so
    that a wrapper such as :class:`~mimkit.objectives.teacher.EMATeacher` can add a term on
    top without knowing the method: ``preds`` (R, L, p·p·C) for every row it decoded,
    ``masks`` (the :class:`~mimkit.masking.Masks` of those rows) and ``rows`` (R,), the
    batch index of the image each row belongs to.
    """

    def __init__(self, model: MaskedAutoencoderViT, mask_ratio: float) -> None:
        super().__init__()
        self.model, self.mask_ratio = model, mask_ratio

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> dict:
        masks = random_masking(noise, self.mask_ratio)
        out = self.model(imgs, masks=masks)
        rows = torch.arange(imgs.shape[0], device=imgs.device)
        return {"loss": out.loss, "loss_rec": out.loss, "pred": out.pred, "mask": out.mask,
                "preds": out.pred, "masks": masks, "rows": rows}

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step (EMA teachers update here)."""

    def eval_model(self) -> MaskedAutoencoderViT:
        """The weights evaluation and export use by default."""
        return self.model
