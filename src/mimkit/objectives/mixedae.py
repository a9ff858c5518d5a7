"""MixedAE: r-way image mixing + homologous recognition (docs/methods/mixedae.md).

Each group of r images is mixed into one sequence of the usual length: position n carries
image σ(n)'s patch n, so the encoder sees ``(B/r, 1+L, D)``. Homologous attention (each
query keeps its top-k keys, trained by a contrastive loss on its logits) and a homologous
contrastive loss on the features make every patch find the patches of its own image; the
encoder output is then un-mixed and each image is decoded exactly as MAE.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.config import SegmentEmbed, choices
from mimkit.masking import Masks, gather_tokens, mixing_masks, num_parts_for
from mimkit.models.mae import MaskedAutoencoderViT
from mimkit.objectives.base import Objective, ObjectiveOutput, section_kwargs

SEGMENT_EMBEDS = choices(SegmentEmbed)


# --- homologous attention --------------------------------------------------------------------
def topk_keep(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Bool keep-mask (…, 1+N, 1+N) for logits whose token 0 is cls.

    Each patch query keeps its ``topk`` largest patch-key logits plus the cls key (our choice,
    docs/methods/mixedae.md). The cls query, which belongs to no source, keeps every key.
    """
    patch_logits = logits[..., 1:, 1:]
    if not 1 <= topk <= patch_logits.shape[-1]:
        raise ValueError(f"mixedae.topk={topk}: must be in [1, {patch_logits.shape[-1]}] patch keys")
    idx = patch_logits.detach().topk(topk, dim=-1).indices  # the selection itself has no gradient
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[..., 1:, 1:] = torch.zeros_like(patch_logits, dtype=torch.bool).scatter_(-1, idx, True)
    return keep


def oracle_keep(source: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask (1+N, 1+N) from the true sources (N,): same-source keys, cls always."""
    n = source.shape[0]
    keep = torch.ones(n + 1, n + 1, dtype=torch.bool, device=source.device)
    keep[1:, 1:] = source[:, None] == source[None, :]
    return keep


def topk_attention(attn: nn.Module, x: torch.Tensor,
                   topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ``Attention`` forward whose softmax sees only each query's top-k logits.

    Reuses the module's own ``qkv``/``proj`` (and q/k norms), so state dicts stay official-MAE
    compatible and the same block is a plain ViT block at fine-tuning. Returns the output, the
    keep-mask and the logits (B, heads, N, N); the softmax is done here because the logits are
    needed to choose the keys anyway.
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    keep = topk_keep(logits, topk)
    weights = attn.attn_drop(logits.masked_fill(~keep, float("-inf")).softmax(dim=-1))
    out = (weights @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), keep, logits


def homologous_block(blk: Block, x: torch.Tensor,
                     topk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ``Block`` forward with top-k attention; same residual structure as ``Block.forward``.

    Returns the output, the keep-mask and the attention logits (B, heads, 1+N, 1+N).
    """
    attn_out, keep, logits = topk_attention(blk.attn, blk.norm1(x), topk)
    x = x + blk.drop_path1(blk.ls1(attn_out))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, keep, logits


def homologous_accuracy(keep: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Fraction of kept patch keys that share the patch query's source (cls excluded)."""
    same = source[:, None] == source[None, :]
    kept = keep[..., 1:, 1:]
    return (kept & same).sum() / kept.sum().clamp(min=1)


def feature_homologous_accuracy(z: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Fraction of each patch's nearest other patches (cosine) that share its source.

    ``z`` (G, N, d) are ℓ2-normalised patch embeddings; each patch looks at as many neighbours
    as its source has other patches, so 1 is a perfect grouping and chance is about 1/r.
    """
    n = z.shape[1]
    k = int((source == source[0]).sum()) - 1
    if k < 1:
        return z.new_ones(())
    sim = (z @ z.transpose(1, 2)).masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    idx = sim.topk(k, dim=-1).indices  # (G, N, k)
    return (source[idx] == source[:, None]).float().mean()


# --- homologous contrastive ------------------------------------------------------------------
def supcon(logits: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Supervised-contrastive loss over the last two dims of ``logits`` (…, N, N), scores of
    query i for key j: mean over queries of minus the mean log-probability of the keys that
    share the query's source, self excluded from both (SupCon, Khosla et al. 2020)."""
    n = logits.shape[-1]
    self_mask = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)
    positive = (source[:, None] == source[None, :]) & ~self_mask
    pos_log_prob = log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1).clamp(min=1)
    return -pos_log_prob.mean()


def homologous_attention_loss(logits: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """SupCon on a homologous block's patch-to-patch attention logits (B, heads, 1+N, 1+N).

    The top-k selection carries no gradient, so without this term nothing teaches the queries
    and keys to score same-source patches higher (docs/methods/mixedae.md). The logits keep
    the attention's own scale (q·k/√d) as the temperature; the cls row and column are left out.
    """
    return supcon(logits[..., 1:, 1:], source)


def homologous_contrastive(z: torch.Tensor, source: torch.Tensor, temperature: float = 0.2,
                           prototype: bool = False, num_sources: int | None = None) -> torch.Tensor:
    """Supervised-contrastive InfoNCE within each mixed sample (docs/methods/mixedae.md).

    ``z`` (G, N, d) are ℓ2-normalised patch embeddings, ``source`` (N,) their source slot.
    Default: every other patch of the same source is a positive, other sources' patches are
    negatives (SupCon, mean log-probability over positives). ``prototype``: each patch is
    classified against the per-source mean embeddings (ℓ2-normalised) of its sample.
    """
    if prototype:
        num_sources = num_sources or int(source.max()) + 1
        onehot = F.one_hot(source, num_sources).to(z.dtype)  # (N, r)
        protos = F.normalize(torch.einsum("gnd,nr->grd", z, onehot), dim=-1)
        logits = z @ protos.transpose(1, 2) / temperature  # (G, N, r)
        return F.cross_entropy(logits.flatten(0, 1), source.repeat(z.shape[0]))
    return supcon(z @ z.transpose(1, 2) / temperature, source)


# --- mixing and un-mixing --------------------------------------------------------------------
def mix_tokens(tokens: torch.Tensor, masks: Masks, ways: int) -> torch.Tensor:
    """(B, L, D) embedded tokens → (B/r, r·n_v, D) mixed sequences, slot-major.

    Image ``b = g·r + s`` contributes its visible tokens (``masks`` row b) to group g, in slot
    s's block of the sequence. Attention ignores token order, so the sequence order tells the
    model nothing about the sources; the position embedding added before carries patch n.
    """
    visible = gather_tokens(tokens, masks.ids_keep)  # (B, n_v, D)
    return visible.reshape(visible.shape[0] // ways, ways * visible.shape[1], visible.shape[2])


def unmix_tokens(x: torch.Tensor, ways: int) -> torch.Tensor:
    """Inverse of :func:`mix_tokens` for encoder outputs with cls: (B/r, 1+r·n_v, D) → (B, 1+n_v, D).

    Every image gets its own tokens back and the mixed sample's cls token.
    """
    groups, length, dim = x.shape
    patches = x[:, 1:].reshape(groups * ways, (length - 1) // ways, dim)
    cls = x[:, :1].repeat_interleave(ways, dim=0)
    return torch.cat([cls, patches], dim=1)


class MixedAE(Objective):
    """MixedAE objective. ``ways`` images per mixed sample (0: K = 1/(1-mask_ratio)).

    Each image keeps L/K patches (part s of its group's partition), so with ``ways = K`` the
    mixed sequence has exactly L patches, and with ``ways = 1`` (no mixing, no contrastive
    weight) the objective is MAE. The projection head and segment embeddings live here, not
    in the model, so the model's state dict stays official-MAE compatible.
    """

    section = "mixedae"

    def __init__(
        self,
        model: MaskedAutoencoderViT,
        mask_ratio: float,
        ways: int = 0,
        attn_blocks: list[int] | None = None,
        topk: int = 0,
        oracle: bool = False,
        hc_weight: float = 0.5,
        attn_weight: float = 1.0,
        hc_temperature: float = 0.2,
        hc_proj_dim: int = 128,
        hc_prototype: bool = False,
        segment_embed: str = "none",
    ) -> None:
        super().__init__()
        self.model = model
        self.num_parts = num_parts_for(mask_ratio, model.num_patches)
        self.ways = ways or self.num_parts
        if not 1 <= self.ways <= self.num_parts:
            raise ValueError(
                f"mixedae.ways={ways}: each image keeps L/K patches (K={self.num_parts} for "
                f"mask_ratio={mask_ratio}), so at most K images fit one sequence"
            )
        self.tokens_per_source = model.num_patches // self.num_parts
        self.topk = topk or self.tokens_per_source
        if self.topk > self.ways * self.tokens_per_source:
            raise ValueError(f"mixedae.topk={topk}: a mixed sample has only "
                             f"{self.ways * self.tokens_per_source} patch keys")
        depth = len(model.blocks)
        self.attn_blocks = list(range(depth)) if attn_blocks is None else sorted(set(attn_blocks))
        bad = [i for i in self.attn_blocks if not 0 <= i < depth]
        if bad:
            raise ValueError(f"mixedae.attn_blocks: {bad} out of range for an encoder of depth {depth}")
        if segment_embed not in SEGMENT_EMBEDS:
            raise ValueError(f"mixedae.segment_embed: unknown '{segment_embed}'; "
                             f"choose from {', '.join(SEGMENT_EMBEDS)}")
        self.oracle, self.segment_embed = oracle, segment_embed
        self.hc_weight, self.hc_temperature, self.hc_prototype = hc_weight, hc_temperature, hc_prototype
        if attn_weight < 0:
            raise ValueError(f"mixedae.attn_weight: must be >= 0, got {attn_weight}")
        self.attn_weight = attn_weight
        dim = model.pos_embed.shape[-1]
        self.hc_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, hc_proj_dim))
        if segment_embed != "none":
            # One learned vector per source slot, in encoder width. "decoder" adds it to the
            # un-mixed latents before decoder_embed (a linear map, so it is a per-slot decoder
            # embedding); "encoder" adds it to the mixed tokens and so gives the grouping away.
            self.segment = nn.Parameter(torch.zeros(self.ways, dim))
            nn.init.normal_(self.segment, std=0.02)

    @classmethod
    def from_config(cls, model: MaskedAutoencoderViT, cfg: Any) -> MixedAE:
        """As any base, and the batch is checked now rather than at the first step."""
        objective = cls(model, cfg.mask_ratio, **section_kwargs(cfg, cls.section))
        objective.check_batch(cfg.train.batch_size)
        return objective

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.ways:
            raise ValueError(
                f"MixedAE mixes {self.ways} images per sample, but the batch has {batch_size}: "
                f"set train.batch_size to a multiple of {self.ways} (or change mixedae.ways)"
            )

    def source(self, device: torch.device) -> torch.Tensor:
        """Source slot of each patch position of a mixed sequence (slot-major), (r·n_v,)."""
        return torch.arange(self.ways, device=device).repeat_interleave(self.tokens_per_source)

    def encode_mixed(self, mixed: torch.Tensor,
                     source: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Encoder over mixed tokens with homologous attention in ``attn_blocks``.

        Returns the normed output, and per top-k block its homologous accuracy and
        attention loss.
        """
        x = self.model.add_cls(mixed)
        accs, attn_losses = [], []
        # With one source every key is homologous: skip the masking (plain blocks, exact MAE).
        homologous = set(self.attn_blocks) if self.ways > 1 else set()
        oracle_mask = oracle_keep(source) if self.oracle else None
        for i, blk in enumerate(self.model.blocks):
            if i not in homologous:
                x = blk(x)
            elif self.oracle:
                x = blk(x, attn_mask=oracle_mask)  # SDPA bool mask: True = attend
            else:
                x, keep, logits = homologous_block(blk, x, self.topk)
                accs.append(homologous_accuracy(keep.detach(), source).float())
                attn_losses.append(homologous_attention_loss(logits, source))
        return self.model.norm(x), accs, attn_losses

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor, progress: float = 0.0) -> ObjectiveOutput:
        self.check_batch(imgs.shape[0])
        masks = mixing_masks(noise, self.ways, self.num_parts)  # per image, from its group's noise
        tokens = self.model.embed(imgs)
        source = self.source(imgs.device)
        slot = torch.arange(imgs.shape[0], device=imgs.device) % self.ways
        if self.segment_embed == "encoder":
            tokens = tokens + self.segment[slot].unsqueeze(1)
        latent_mixed, accs, attn_losses = self.encode_mixed(mix_tokens(tokens, masks, self.ways), source)

        # Un-mix: each image gets back its own tokens and is decoded exactly as MAE.
        latent = unmix_tokens(latent_mixed, self.ways)
        if self.segment_embed == "decoder":
            latent = torch.cat([latent[:, :1], latent[:, 1:] + self.segment[slot].unsqueeze(1)], dim=1)
        pred = self.model.forward_decoder(latent, masks.ids_restore)
        loss_rec = self.model.forward_loss(imgs, pred, masks.mask)

        z = F.normalize(self.hc_head(latent_mixed[:, 1:]), dim=-1)
        loss_hc = homologous_contrastive(z, source, self.hc_temperature, self.hc_prototype, self.ways)
        loss = loss_rec + self.hc_weight * loss_hc
        terms = {"loss_rec": loss_rec, "loss_hc": loss_hc}
        if self.ways > 1:
            terms["acc_homologous_feat"] = feature_homologous_accuracy(z.detach(), source)
        if attn_losses:
            terms["loss_attn"] = torch.stack(attn_losses).mean()
            # Skipped at weight 0 so that the objective's gradients are exactly those without it.
            if self.attn_weight:
                loss = loss + self.attn_weight * terms["loss_attn"]
        if accs:
            terms["acc_homologous"] = torch.stack(accs).mean()
        elif self.oracle and self.ways > 1:
            terms["acc_homologous"] = latent_mixed.new_ones(())
        rows = torch.arange(imgs.shape[0], device=imgs.device)
        return ObjectiveOutput(loss, terms, pred, masks.mask, pred, masks, rows)
