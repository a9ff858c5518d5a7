"""ViT building blocks shared by every method: patches, sin-cos tables, timm blocks (docs/methods/mae.md)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, L, p·p·C); row-major grid, inside a patch row, column, channel."""
    b, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int], in_chans: int) -> torch.Tensor:
    """Exact inverse of :func:`patchify`."""
    gh, gw = grid
    p = patch_size
    x = x.reshape(x.shape[0], gh, gw, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], in_chans, gh * p, gw * p)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[sin(pos·ω_k), cos(pos·ω_k)]``, ``ω_k = 10000^(-k/(dim/2))``, in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D table (1, [1+] gh·gw, dim); first half encodes the column (x), as official MAE."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding dim must be a multiple of 4, got {dim}")
    gh, gw = grid
    xs, ys = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate([sincos_1d(dim // 2, xs), sincos_1d(dim // 2, ys)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, 1+L, D) table to another grid, keeping the cls row."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """Pre-norm timm blocks (qkv bias on, GELU, LayerNorm eps 1e-6, fused SDPA attention)."""
    if dim % num_heads:
        raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
    return nn.ModuleList(
        Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)
    )


class CrossBlock(nn.Module):
    """Pre-norm cross-attention block (CrossMAE, Fu et al. 2024): queries attend only to a
    context (the visible tokens), never to each other, then an MLP; both residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm1, self.norm_context = LayerNorm(dim), LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, m, dim = x.shape
        heads = self.num_heads
        q = self.q(self.norm1(x)).view(b, m, heads, dim // heads).transpose(1, 2)
        k, v = self.kv(self.norm_context(context)).view(b, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, m, dim)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


def make_cross_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float) -> nn.ModuleList:
    """``depth`` :class:`CrossBlock` layers (a CrossMAE decoder)."""
    return nn.ModuleList(CrossBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
