"""The same MAE assembled from lightly's modules, holding a mimkit model's weights.

lightly (>= 1.6) builds MAE from a stock timm ``VisionTransformer`` wrapped in
``MaskedVisionTransformerTIMM`` (the encoder) and ``MaskedVisionTransformerDecoderTIMM`` (mask
token, fixed sin-cos table, blocks, norm); the decoder's input projection and prediction head
live outside it. Its masks are index tensors over the token sequence *including* the cls
token (index 0), and it predicts only the masked patches. Used by ``mimkit bench`` to compare
speed and memory on identical work; needs ``pip install lightly``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from mimkit.masking import num_visible
from mimkit.models.mae import MaskedAutoencoderViT


class LightlyMAE(nn.Module):
    """MAE on lightly's modules: ``forward(imgs, noise)`` gives the norm-pix loss on masked patches."""

    def __init__(self, arch: dict, norm_pix_loss: bool = True, mask_ratio: float = 0.75) -> None:
        super().__init__()
        from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
        from timm.models.vision_transformer import VisionTransformer

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        img_size, patch = arch["img_size"], arch["patch_size"]
        vit = VisionTransformer(
            img_size=tuple(img_size), patch_size=patch, in_chans=arch["in_chans"], num_classes=0,
            embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
            mlp_ratio=arch["mlp_ratio"], qkv_bias=True, norm_layer=norm_layer,
        )
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)  # makes pos_embed fixed sin-cos
        # The encoder's own mask token is unused by MAE (the encoder never sees masked patches).
        self.backbone.mask_token.requires_grad_(False)
        self.decoder_embed = nn.Linear(arch["embed_dim"], arch["decoder_embed_dim"])
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, embed_dim=arch["decoder_embed_dim"],
            depth=arch["decoder_depth"], num_heads=arch["decoder_num_heads"],
            mlp_ratio=arch["mlp_ratio"], norm_layer=norm_layer,
        )
        self.decoder_pred = nn.Linear(arch["decoder_embed_dim"], patch * patch * arch["in_chans"])
        self.patch_size, self.norm_pix_loss, self.mask_ratio = patch, norm_pix_loss, mask_ratio

    @classmethod
    def from_mimkit(cls, model: MaskedAutoencoderViT) -> LightlyMAE:
        """The lightly model with ``model``'s architecture and weights."""
        out = cls(model.arch, model.norm_pix_loss, model.mask_ratio)
        state = to_lightly_state_dict(model.state_dict())
        state["backbone.mask_token"] = out.backbone.mask_token.detach()
        out.load_state_dict(state, strict=True)
        return out.to(next(model.parameters()).device)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss, predictions ``(B, n_masked, p·p·C)`` and ``idx_mask`` (patch indices, no cls)."""
        from lightly.models import utils

        batch, length = noise.shape
        ids_shuffle = torch.argsort(noise, dim=1)  # same convention as MAE: small noise is kept
        keep = num_visible(length, self.mask_ratio)
        cls_index = torch.zeros(batch, 1, dtype=ids_shuffle.dtype, device=noise.device)
        idx_keep = torch.cat([cls_index, ids_shuffle[:, :keep] + 1], dim=1)  # +1: cls is token 0
        idx_mask = ids_shuffle[:, keep:] + 1

        latent = self.backbone.encode(imgs, idx_keep=idx_keep)
        x = self.decoder_embed(latent)
        tokens = utils.repeat_token(self.decoder.mask_token, (batch, length + 1))
        tokens = utils.set_at_index(tokens, idx_keep, x.type_as(tokens))
        x = self.decoder(tokens)  # + sin-cos table, blocks, norm
        pred = self.decoder_pred(utils.get_at_index(x, idx_mask))

        target = utils.get_at_index(utils.patchify(imgs, self.patch_size), idx_mask - 1)
        if self.norm_pix_loss:
            target = utils.normalize_mean_var(target, dim=-1)  # unbiased variance, eps 1e-6
        loss = nn.functional.mse_loss(pred, target)
        return {"loss": loss, "pred": pred, "idx_mask": idx_mask - 1}


def to_lightly_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official-MAE state dict to :class:`LightlyMAE`'s names."""
    out = {}
    for key, value in state.items():
        if key.startswith(("decoder_embed.", "decoder_pred.")):
            out[key] = value
        elif key == "mask_token":
            out["decoder.mask_token"] = value
        elif key == "decoder_pos_embed":
            out["decoder.pos_embed"] = value
        elif key.startswith("decoder_blocks."):
            out["decoder.blocks." + key.removeprefix("decoder_blocks.")] = value
        elif key.startswith("decoder_norm."):
            out["decoder.norm." + key.removeprefix("decoder_norm.")] = value
        else:  # encoder: timm's VisionTransformer uses the official names
            out["backbone.vit." + key] = value
    return out
