"""Plain MAE (He et al., 2021): one random mask per image, reconstruction of masked patches."""

from __future__ import annotations

from typing import Any

import torch

from mimkit.masking import Masks, predicted_subset, random_masking
from mimkit.models.mae import MaskedAutoencoderViT
from mimkit.objectives.base import Objective, ObjectiveOutput


class MAE(Objective):
    """The base objective: one random mask per image, the masked patches reconstructed.

    ``predict_ratio < 1`` is partial reconstruction (PR-MIM; docs/methods/mae.md): the decoder
    sees the visible tokens plus mask tokens for only that share of the masked patches, a
    subset drawn from the same noise (:func:`~mimkit.masking.predicted_subset`), and the loss
    covers only them. The ``masks`` handed to wrappers then mark the scored patches, so an EMA
    teacher's consistency term covers the same ones.
    """

    partial_reconstruction = True

    def __init__(self, model: MaskedAutoencoderViT, mask_ratio: float, predict_ratio: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < predict_ratio <= 1.0:
            raise ValueError(f"decoder.predict_ratio: must be in (0, 1], got {predict_ratio}")
        self.model, self.mask_ratio, self.predict_ratio = model, mask_ratio, predict_ratio

    @classmethod
    def from_config(cls, model: MaskedAutoencoderViT, cfg: Any) -> MAE:
        return cls(model, cfg.mask_ratio, predict_ratio=cfg.decoder.predict_ratio)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> ObjectiveOutput:
        masks = random_masking(noise, self.mask_ratio)
        # predict_ratio = 1 keeps the full decoder: exactly the MAE computation
        ids_pred = predicted_subset(noise, masks, self.predict_ratio) if self.predict_ratio < 1 else None
        out = self.model(imgs, masks=masks, ids_pred=ids_pred)
        rows = torch.arange(imgs.shape[0], device=imgs.device)
        scored = masks if ids_pred is None else Masks(masks.ids_keep, masks.ids_restore, out.scored)
        return ObjectiveOutput(out.loss, {"loss_rec": out.loss}, out.pred, out.mask, out.pred, scored, rows)
