"""Models: the MAE ViT and its building blocks."""

from __future__ import annotations

from mimkit.models.mae import ARCHS, MAEOutput, MaskedAutoencoderViT, build_model

__all__ = ["ARCHS", "MAEOutput", "MaskedAutoencoderViT", "build_model", "model_from_config"]


def model_from_config(cfg) -> MaskedAutoencoderViT:
    """Build the MAE described by a :class:`mimkit.config.Config` (with ``train.grad_checkpointing``)."""
    m = cfg.model
    model = build_model(
        m.arch, img_size=m.img_size, in_chans=m.in_chans, patch_size=m.patch_size,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
        decoder_num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio,
        norm_pix_loss=cfg.norm_pix_loss, mask_ratio=cfg.mask_ratio, decoder_kind=cfg.decoder.kind,
    )
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    return model
