"""A small vision transformer whose attention is SOFT or softmax, for like-for-like comparisons.

Plain PyTorch; :class:`lightning_bpfree.attention.module.ViTClassifier` trains it with Lightning.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_bpfree.attention.soft import SOFTAttention, head_size
from lightning_bpfree.validation import check_choice, check_positive_int

SOFTMAX_BACKENDS = ("sdpa", "eager")
ATTENTION_KINDS = ("soft", *SOFTMAX_BACKENDS)


class SoftmaxAttention(nn.Module):
    """Multi-head softmax self-attention with the interface of :class:`SOFTAttention`.

    Args:
        dim: embedding size ``C`` (divisible by ``num_heads``).
        num_heads: number of heads.
        backend: ``"sdpa"`` (``F.scaled_dot_product_attention``, memory-efficient kernels) or ``"eager"``
            (the explicit ``softmax(Q K^T / sqrt(d)) V``, which materialises the ``N x N`` matrix).
    """

    def __init__(self, dim: int, num_heads: int, backend: str = "sdpa") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_size(dim, num_heads)
        self.backend = check_choice("backend", backend, SOFTMAX_BACKENDS)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, hw: tuple[int, int] | None = None) -> Tensor:
        """``x [B, N, C] -> [B, N, C]``; ``key_padding_mask`` bool ``[B, N]`` (True = padding); ``hw`` unused."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if self.backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        else:
            scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
            if attend is not None:
                scores = scores.masked_fill(~attend, float("-inf"))
            out = scores.softmax(-1) @ v
        return self.out(out.transpose(1, 2).reshape(B, N, C))


def make_attention(kind: str, dim: int, num_heads: int, **soft_options) -> nn.Module:
    """``"soft"`` gives :class:`SOFTAttention` (with ``soft_options``), ``"sdpa"``/``"eager"`` softmax."""
    if check_choice("attention", kind, ATTENTION_KINDS) == "soft":
        return SOFTAttention(dim, num_heads, **soft_options)
    return SoftmaxAttention(dim, num_heads, backend=kind)


class Block(nn.Module):
    """Transformer block, post-norm ``LN(x + attn(x))`` as in SOFT's reference or pre-norm ``x + attn(LN(x))``.

    SOFT's Gaussian kernel is not row-normalised, so its output grows with the number of tokens; the
    post-norm LayerNorm after the residual keeps the block's output scale fixed.
    """

    def __init__(
        self, dim: int, num_heads: int, attention: str, mlp_ratio: int = 2, post_norm: bool = True, **soft_options
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim)
        self.attn = make_attention(attention, dim, num_heads, **soft_options)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, hw=hw))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), hw=hw)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, learned positions, ``depth`` blocks, mean-pooled linear head.

    Args:
        image_size: side of the square input images (pixels).
        patch_size: side of a patch; ``(image_size / patch_size)^2`` tokens.
        in_channels: image channels.
        num_classes: output classes.
        dim: embedding size.
        depth: number of blocks.
        num_heads: attention heads.
        attention: ``"soft"``, ``"sdpa"`` or ``"eager"``.
        post_norm: post-norm blocks (SOFT's reference) rather than pre-norm.
        **soft_options: :class:`SOFTAttention` options (``num_landmarks``, ``newton_iters``, ...).
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 2,
        in_channels: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        num_heads: int = 2,
        attention: str = "soft",
        post_norm: bool = True,
        **soft_options: Any,
    ) -> None:
        super().__init__()
        if check_positive_int("image_size", image_size) % check_positive_int("patch_size", patch_size) != 0:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.grid[0] * self.grid[1], dim))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, attention, post_norm=post_norm, **soft_options) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, C, H, W] -> logits [B, num_classes]``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x, self.grid)
        return self.head(self.norm(x).mean(1))
