"""The MAE model: encoder, decoder, loss — official-MAE state-dict names (docs/methods/mae.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from timm.layers import PatchEmbed, to_2tuple
from timm.models import checkpoint_seq
from torch import nn

from mimkit.config import DecoderKind, choices
from mimkit.masking import Masks, gather_tokens, random_masking
from mimkit.models.archs import ARCHS
from mimkit.models.vit import LayerNorm, make_blocks, make_cross_blocks, patchify, sincos_2d, unpatchify

DECODER_KINDS = choices(DecoderKind)  # MAE's self-attention decoder | CrossMAE's cross-attention one
DECODER_DEFAULTS = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)


@dataclass
class MAEOutput:
    """What a forward pass returns; ``mask`` is 1 where a patch was masked.

    With partial reconstruction (``ids_pred``), ``pred`` holds the predicted patches and zeros
    elsewhere, and ``scored`` is 1 on the patches the loss covers; otherwise ``scored`` is
    ``mask``.
    """

    loss: torch.Tensor
    pred: torch.Tensor  # (B, L, p·p·C), in the target's space (norm-pix or raw)
    mask: torch.Tensor  # (B, L)
    ids_restore: torch.Tensor  # (B, L)
    scored: torch.Tensor  # (B, L)


class MaskedAutoencoderViT(nn.Module):
    """MAE with a timm-block ViT encoder and a light decoder."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        decoder_kind: str = "self",
    ) -> None:
        super().__init__()
        if decoder_kind not in DECODER_KINDS:
            raise ValueError(f"decoder.kind: '{decoder_kind}' is not one of {', '.join(DECODER_KINDS)}")
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self.grad_checkpointing = False
        self.arch = dict(
            img_size=list(img_size), patch_size=patch_size, in_chans=in_chans,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
        )
        self.decoder_kind = decoder_kind
        if decoder_kind != "self":  # recorded only when set, so MAE checkpoints keep their arch
            self.arch["decoder_kind"] = decoder_kind

        # Encoder. Position tables are parameters with requires_grad=False, as in the
        # official code, so that official checkpoints carry and load them by name.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = make_blocks(embed_dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(embed_dim)

        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        make = make_cross_blocks if decoder_kind == "cross" else make_blocks
        self.decoder_blocks = make(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official MAE init: sin-cos tables, xavier everywhere, normal(0.02) tokens."""
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid))
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid))
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder and decoder blocks in the backward instead of storing their
        activations (timm's ``set_grad_checkpointing``); gradients are unchanged."""
        self.grad_checkpointing = enable

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """``blocks`` in sequence, checkpointed when enabled and gradients are recorded."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            # non-reentrant: works with inputs that need no grad and with torch.compile
            return checkpoint_seq(blocks, x, use_reentrant=False)
        for blk in blocks:
            x = blk(x)
        return x

    # --- patches and targets -------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.grid, self.in_chans)

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch target: normalized pixels with unbiased variance when ``norm_pix_loss``."""
        return self.normalize_target(self.patchify(imgs))

    def normalize_target(self, target: torch.Tensor) -> torch.Tensor:
        """Per-patch normalisation of patchified pixels (identity without ``norm_pix_loss``)."""
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    # --- encoder / decoder ---------------------------------------------------------------
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, (B, L, D), before masking."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def add_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_encoder(
        self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encode the visible patches ``ids_keep`` (all when None); returns (B, 1+N, D)."""
        x = self.embed(imgs)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        return self.encode_tokens(x)

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend cls, run the blocks and the final norm on embedded (B, N, D) tokens.

        Methods that build their own token sets (EMAE's stacked parts, which embed each image
        once) call this so that the encoder stays defined in one place.
        """
        return self.norm(self.run_blocks(self.blocks, self.add_cls(x)))

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, ids_keep: torch.Tensor | None = None,
        ids_pred: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict every patch (B, L, p·p·C) from (B, 1+N, D) latents.

        ``latent[:, 1+i]`` is patch ``ids_keep[:, i]``; ``ids_keep = argsort(ids_restore)[:, :N]``
        is derived when not given. With ``ids_pred`` (B, M), partial reconstruction: the decoder
        sees the visible tokens and mask tokens for those M patches only, and returns their
        predictions (B, M, p·p·C).
        """
        x = self.decoder_embed(latent)
        b, n1, dim = x.shape
        if ids_keep is None:
            ids_keep = torch.argsort(ids_restore, dim=1)[:, : n1 - 1]
        if self.decoder_kind == "cross":
            return self.forward_cross_decoder(x, ids_keep, ids_pred)
        if ids_pred is not None:
            return self.forward_partial_decoder(x, ids_keep, ids_pred)
        # Official: cat mask tokens, un-shuffle with ids_restore, cat cls, add the table. One
        # scatter of the visible rows into (mask_token + table) gives the same values with
        # two full-size copies fewer forward and backward.
        rows = torch.cat([ids_keep.new_zeros(b, 1), ids_keep + 1], dim=1)  # +1: cls is row 0
        pos = self.decoder_pos_embed
        visible = x + gather_tokens(pos.expand(b, -1, -1), rows)
        x = (self.mask_token + pos).expand(b, -1, -1).scatter(1, rows.unsqueeze(-1).expand(-1, -1, dim), visible)
        x = self.run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_partial_decoder(
        self, x: torch.Tensor, ids_keep: torch.Tensor, ids_pred: torch.Tensor
    ) -> torch.Tensor:
        """Decoder on embedded visible tokens (B, 1+N, D') plus mask tokens for ``ids_pred`` only.

        Attention is permutation-equivariant, so the mask tokens are appended after the
        visible ones; the position tables say where each token sits.
        """
        b = x.shape[0]
        pos = self.decoder_pos_embed.expand(b, -1, -1)
        rows = torch.cat([ids_keep.new_zeros(b, 1), ids_keep + 1], dim=1)  # +1: cls is row 0
        queries = self.mask_token + gather_tokens(pos, ids_pred + 1)
        x = torch.cat([x + gather_tokens(pos, rows), queries], dim=1)
        x = self.run_blocks(self.decoder_blocks, x)
        # norm and prediction head only on the rows that are scored
        return self.decoder_pred(self.decoder_norm(x[:, rows.shape[1]:]))

    def forward_cross_decoder(
        self, x: torch.Tensor, ids_keep: torch.Tensor, ids_pred: torch.Tensor | None
    ) -> torch.Tensor:
        """CrossMAE decoder: a mask-token query per patch in ``ids_pred`` (every patch when
        None, in patch order) attends to the embedded visible tokens (B, 1+N, D') in each block.

        Queries never attend to each other, so a patch's prediction does not depend on which
        other patches are decoded.
        """
        b = x.shape[0]
        pos = self.decoder_pos_embed.expand(b, -1, -1)
        rows = torch.cat([ids_keep.new_zeros(b, 1), ids_keep + 1], dim=1)  # +1: cls is row 0
        context = x + gather_tokens(pos, rows)
        queries = self.mask_token + (pos[:, 1:] if ids_pred is None else gather_tokens(pos, ids_pred + 1))
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.decoder_blocks:
            queries = (torch.utils.checkpoint.checkpoint(blk, queries, context, use_reentrant=False)
                       if checkpointed else blk(queries, context))
        return self.decoder_pred(self.decoder_norm(queries))

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, ids_pred: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean squared error on masked patches, averaged over the whole batch.

        With ``ids_pred``, ``pred`` is (B, M, p·p·C) for those patches, and the loss is their
        mean (each image scores the same number, so it is the masked mean over them).
        """
        if ids_pred is None:
            return masked_mean((pred - self.target(imgs)) ** 2, mask)
        # per-patch norm-pix statistics: gather the patches first, then normalise only them
        target = self.normalize_target(gather_tokens(self.patchify(imgs), ids_pred))
        return ((pred - target) ** 2).mean()

    def forward(
        self,
        imgs: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        masks: Masks | None = None,
        ids_pred: torch.Tensor | None = None,
    ) -> MAEOutput:
        """MAE forward. ``noise`` (B, L) or precomputed ``masks`` make masking reproducible.

        ``ids_pred`` (B, M): partial reconstruction, decoding and scoring only those masked
        patches (:func:`mimkit.masking.predicted_subset`).
        """
        if masks is None:
            if noise is None:
                noise = torch.rand(imgs.shape[0], self.num_patches, device=imgs.device)
            masks = random_masking(noise, self.mask_ratio if mask_ratio is None else mask_ratio)
        latent = self.forward_encoder(imgs, masks.ids_keep)
        pred = self.forward_decoder(latent, masks.ids_restore, masks.ids_keep, ids_pred)
        loss = self.forward_loss(imgs, pred, masks.mask, ids_pred)
        if ids_pred is None:
            return MAEOutput(loss, pred, masks.mask, masks.ids_restore, masks.mask)
        # full-size views for pictures and wrappers: predictions and scored patches in place
        scored = torch.zeros_like(masks.mask).scatter(1, ids_pred, 1.0)
        full = pred.new_zeros(pred.shape[0], self.num_patches, pred.shape[-1])
        full = full.scatter(1, ids_pred.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), pred)
        return MAEOutput(loss, full, masks.mask, masks.ids_restore, scored)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder tokens (B, 1+L, D) after the final norm, for evaluation."""
        return self.forward_encoder(imgs, None)


def masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_i m_i · mean_j err_ij / Σ_i m_i`` — the MAE loss reduction."""
    return (err.mean(dim=-1) * mask).sum() / mask.sum()


def build_model(arch: str = "vit_base_patch16", **overrides) -> MaskedAutoencoderViT:
    """Build an MAE from a preset name in :data:`ARCHS`; keyword arguments override it."""
    if arch not in ARCHS:
        import difflib

        close = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown model.arch '{arch}'{hint}; choose from {sorted(ARCHS)}")
    kwargs = {**DECODER_DEFAULTS, **ARCHS[arch]}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return MaskedAutoencoderViT(**kwargs)
