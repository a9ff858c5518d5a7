"""EMAE: K parallel masks per image plus a self-consistency loss (docs/methods/emae.md).

The image's patches are split into K = 1/(1-mask_ratio) disjoint visible sets (one
permutation per image, :func:`~mimkit.masking.partition_masking`); every part is an MAE
problem, and predictions of a patch masked in several parts are pulled together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mimkit.config import ScDistance, ScTarget, choices
from mimkit.masking import Masks, gather_tokens, num_parts_for, partition_masking, stack_masks
from mimkit.models.mae import MaskedAutoencoderViT, masked_mean
from mimkit.objectives.base import Objective, ObjectiveOutput

SC_DISTANCES, SC_TARGETS = choices(ScDistance), choices(ScTarget)


def sc_distance(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-patch distance (…, L) averaged over the patch's values, like the MAE loss."""
    if kind == "mse":
        err = (pred - target) ** 2
    elif kind == "l1":
        err = (pred - target).abs()
    elif kind == "smooth_l1":
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0)
    else:
        raise ValueError(f"emae.sc_distance: unknown '{kind}'; choose from {', '.join(SC_DISTANCES)}")
    return err.mean(dim=-1)


def self_consistency(preds: list[torch.Tensor], masks: list[torch.Tensor], distance: str = "mse",
                     target: str = "other") -> torch.Tensor:
    """EMAE self-consistency (a [choice] of docs/methods/emae.md) on patches masked in more than one part.

    ``target='other'``: for each ordered pair i≠j, ``distance(pred_i, sg(pred_j))`` averaged over
    the patches masked in both, then over the pairs that share at least one such patch.
    ``target='mean'``: part i against sg(mean of the other parts that mask the same patch),
    averaged over those patches, then over parts. Zero when no patch is masked twice (one
    part, or K = 2), so ``λ·L_sc`` never turns the loss into NaN. No host sync: empty pairs
    are dropped arithmetically.
    """
    if target not in SC_TARGETS:
        raise ValueError(f"emae.sc_target: unknown '{target}'; choose from {', '.join(SC_TARGETS)}")
    values, valid = [], []
    for i, (pred_i, mask_i) in enumerate(zip(preds, masks, strict=True)):
        others = [j for j in range(len(preds)) if j != i]
        if target == "other":
            for j in others:
                both = mask_i * masks[j]
                dist = sc_distance(pred_i, preds[j].detach(), distance)
                values.append((dist * both).sum() / both.sum().clamp(min=1))
                valid.append(both.sum() > 0)
        elif others:
            count = torch.stack([masks[j] for j in others]).sum(0)  # parts masking each patch
            total = sum(preds[j].detach() * masks[j].unsqueeze(-1) for j in others)
            mean = total / count.clamp(min=1).unsqueeze(-1)
            both = mask_i * (count > 0)
            dist = sc_distance(pred_i, mean, distance)
            values.append((dist * both).sum() / both.sum().clamp(min=1))
            valid.append(both.sum() > 0)
    if not values:
        return preds[0].new_zeros(())
    valid_t = torch.stack(valid).to(preds[0].dtype)
    return (torch.stack(values) * valid_t).sum() / valid_t.sum().clamp(min=1)


class EMAE(Objective):
    """EMAE objective. ``num_parts`` parts are run (0: all K); part 0 is MAE's random mask.

    ``sequential=False`` stacks the parts on the batch axis part-major (K·B rows) and runs the
    encoder and decoder once. ``sequential=True`` runs them one after another, each under
    activation checkpointing, so that the backward pass also handles one part at a time: peak
    activation memory is that of one part, at the price of re-running each forward once in
    backward. Losses and gradients are the same in both modes (a [choice] of docs/methods/emae.md).
    """

    section = "emae"

    def __init__(
        self,
        model: MaskedAutoencoderViT,
        mask_ratio: float,
        num_parts: int = 0,
        sc_weight: float = 1.0,
        sc_warmup: float = 0.0,
        sc_distance: str = "mse",
        sc_target: str = "other",
        sequential: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.total_parts = num_parts_for(mask_ratio, model.num_patches)  # clear error for bad K
        if not 0 <= num_parts <= self.total_parts:
            raise ValueError(
                f"emae.num_parts={num_parts}: at most K={self.total_parts} parts exist for "
                f"mask_ratio={mask_ratio} (0: all)"
            )
        if sc_distance not in SC_DISTANCES:
            raise ValueError(f"emae.sc_distance: unknown '{sc_distance}'; choose from {', '.join(SC_DISTANCES)}")
        if sc_target not in SC_TARGETS:
            raise ValueError(f"emae.sc_target: unknown '{sc_target}'; choose from {', '.join(SC_TARGETS)}")
        self.num_parts = num_parts or self.total_parts
        self.sc_weight, self.sc_warmup = sc_weight, sc_warmup
        self.sc_distance, self.sc_target, self.sequential = sc_distance, sc_target, sequential

    def sc_lambda(self, progress: float) -> float:
        """λ, warmed up linearly from 0 over the first ``sc_warmup`` fraction of training."""
        if self.sc_warmup > 0:
            return self.sc_weight * min(1.0, progress / self.sc_warmup)
        return self.sc_weight

    def _predict(self, tokens: torch.Tensor, masks: Masks) -> torch.Tensor:
        """Encoder + decoder for embedded tokens (R, L, D) and the rows' masks."""
        latent = self.model.encode_tokens(gather_tokens(tokens, masks.ids_keep))
        return self.model.forward_decoder(latent, masks.ids_restore)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> ObjectiveOutput:
        batch = imgs.shape[0]
        parts = partition_masking(noise, self.total_parts)[: self.num_parts]
        tokens = self.model.embed(imgs)  # each image is embedded once, then gathered per part
        if self.sequential:
            preds = [checkpoint(self._predict, tokens, p, use_reentrant=False) for p in parts]
        else:
            stacked = stack_masks(parts)
            preds = list(self._predict(tokens.repeat(self.num_parts, 1, 1), stacked).split(batch))
        target = self.model.target(imgs)
        # Reconstruction: the MAE loss of each part, averaged over parts (docs/methods/emae.md).
        per_part = [masked_mean((p - target) ** 2, m.mask) for p, m in zip(preds, parts, strict=True)]
        loss_rec = torch.stack(per_part).mean()
        loss_sc = self_consistency(preds, [m.mask for m in parts], self.sc_distance, self.sc_target)
        loss = loss_rec + self.sc_lambda(progress) * loss_sc
        rows = torch.arange(batch, device=imgs.device).repeat(self.num_parts)
        return ObjectiveOutput(loss, {"loss_rec": loss_rec, "loss_sc": loss_sc}, preds[0], parts[0].mask,
                               torch.cat(preds), stack_masks(parts), rows)

    def step_cost(self) -> float:
        return float(self.num_parts)  # K encoder and decoder passes
