"""Token accounting and FLOP estimates for merging ViT encoders."""

from __future__ import annotations

from typing import Sequence

import torch


def block_flops(n_attn: float, n_mlp: float, width: int, mlp_hidden: int) -> float:
    """FLOPs of one pre-norm ViT block: attention on n_attn tokens, MLP on n_mlp tokens
    (a merge sits between the two). Multiply-adds count 2; norms and softmax are ignored."""
    qkv_out = 2 * n_attn * width * 4 * width  # q, k, v and output projections
    scores = 2 * 2 * n_attn * n_attn * width  # QK^T and AV
    mlp = 2 * 2 * n_mlp * width * mlp_hidden
    return qkv_out + scores + mlp


def encoder_flops(counts: Sequence[int], width: int, mlp_hidden: int) -> float:
    """FLOPs of the blocks for one image whose token counts after the embedding and after each
    block are ``counts`` (L + 1 entries)."""
    return sum(block_flops(counts[i], counts[i + 1], width, mlp_hidden) for i in range(len(counts) - 1))


def flop_ratio(counts: torch.Tensor, width: int, mlp_hidden: int) -> float:
    """Unmerged / merged block FLOPs, summed over the images of ``counts`` (B, L+1): the
    speed-up that merging could give at best."""
    full = [int(counts[0, 0])] * counts.shape[1]
    merged = sum(encoder_flops(row, width, mlp_hidden) for row in counts.tolist())
    return counts.shape[0] * encoder_flops(full, width, mlp_hidden) / merged


def padded_flop_overhead(counts: torch.Tensor, width: int, mlp_hidden: int) -> float:
    """Extra block FLOPs spent on padding when ``counts`` (B, L+1) run as one padded batch:
    every layer computes the longest image's length for all images."""
    longest = counts.max(dim=0).values.tolist()
    valid = sum(encoder_flops(row, width, mlp_hidden) for row in counts.tolist())
    return counts.shape[0] * encoder_flops(longest, width, mlp_hidden) / valid - 1.0
