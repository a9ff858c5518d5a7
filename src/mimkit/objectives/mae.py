"""Plain MAE (He et al., 2021): one random mask per image, reconstruction of masked patches."""

from __future__ import annotations

import torch
from torch import nn

from mimkit.masking import Masks, predicted_subset, random_masking
from mimkit.models.mae import MaskedAutoencoderViT


class MAE(nn.Module):
    """The base objective. Every method returns a dict with ``loss`` and its named parts.

    Besides ``pred``/``mask`` (for pictures) a base method exposes what it reconstructed, so
    that a wrapper such as :class:`~mimkit.objectives.teacher.EMATeacher` can add a term on
    top without knowing the method: ``preds`` (R, L, p·p·C) for every row it decoded,
    ``masks`` (the :class:`~mimkit.masking.Masks` of those rows) and ``rows`` (R,), the
    batch index of the image each row belongs to.

    ``predict_ratio < 1`` is partial reconstruction (PR-MIM; docs/methods/mae.md): the decoder
    sees the visible tokens plus mask tokens for only that share of the masked patches, a
    subset drawn from the same noise (:func:`~mimkit.masking.predicted_subset`), and the loss
    covers only them. The ``masks`` handed to wrappers then mark the scored patches, so an EMA
    teacher's consistency term covers the same ones.
    """

    def __init__(self, model: MaskedAutoencoderViT, mask_ratio: float, predict_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < predict_ratio <= 1.0:
            raise ValueError(f"decoder.predict_ratio: must be in (0, 1], got {predict_ratio}")
        self.model, self.mask_ratio, self.predict_ratio = model, mask_ratio, predict_ratio

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> dict:
        masks = random_masking(noise, self.mask_ratio)
        # predict_ratio = 1 keeps the full decoder: exactly the MAE computation
        ids_pred = predicted_subset(noise, masks, self.predict_ratio) if self.predict_ratio < 1 else None
        out = self.model(imgs, masks=masks, ids_pred=ids_pred)
        rows = torch.arange(imgs.shape[0], device=imgs.device)
        scored = masks if ids_pred is None else Masks(masks.ids_keep, masks.ids_restore, out.scored)
        return {"loss": out.loss, "loss_rec": out.loss, "pred": out.pred, "mask": out.mask,
                "preds": out.pred, "masks": scored, "rows": rows}

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step (EMA teachers update here)."""

    def eval_model(self) -> MaskedAutoencoderViT:
        """The weights evaluation and export use by default."""
        return self.model
