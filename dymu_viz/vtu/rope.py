"""RoPE algebra for VTU, pure functions: HF's rotate_half RoPE on q / k laid out in *pair
order* (each pair (x_i, x_{i + D/2}) side by side), as complex factors or as one (D, D) matrix.
Pair order is a permutation of the head dim shared by q and k, so every q . k is unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor


def pair_order(x: Tensor) -> Tensor:
    """(..., D) -> (..., D/2, 2): each rotate_half pair (x_i, x_{i + D/2}) side by side, a view."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2)


def natural_order(x: Tensor) -> Tensor:
    """Undo pair_order on a flattened head dim: (..., D) in pair order -> (..., D), a copy."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


def rotation(cos: Tensor, sin: Tensor) -> Any:
    """HF's RoPE as a factor for pair-ordered x: cos, sin (..., D) -> e^{i theta} (..., D/2),
    complex for float32 / float64 (one multiply), else the (cos, sin) halves (the real form:
    no complex half / bfloat16 product everywhere)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    return torch.complex(c, s) if cos.dtype in (torch.float32, torch.float64) else (c, s)


def rotation_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """HF's RoPE followed by pair ordering as one linear map: cos, sin (..., D) -> m (..., D, D)
    with x @ m = (x * cos + rotate_half(x) * sin) in pair order, for x (D,) in natural order:
    (x @ m)[2i] = x_i cos_i - x_{i+D/2} sin_i, (x @ m)[2i+1] = x_{i+D/2} cos_i + x_i sin_i."""
    D = cos.shape[-1]
    half = D // 2
    c, s = cos[..., :half], sin[..., :half]
    m = cos.new_zeros((*cos.shape[:-1], D * D))
    m[..., _rotation_entries(D, cos.device)] = torch.cat([c, -s, c, s], -1)
    return m.view(*cos.shape[:-1], D, D)


@functools.lru_cache(maxsize=8)
def _rotation_entries(D: int, device: torch.device) -> Tensor:
    """Where ``rotation_matrix`` puts cos, -sin, cos, sin in the flattened (D, D) matrix:
    (row, column) -> row * D + column."""
    i = torch.arange(D // 2, device=device)
    half = D // 2
    return torch.cat([i * D + 2 * i, (i + half) * D + 2 * i, (i + half) * D + 2 * i + 1, i * D + 2 * i + 1])


def rotate_by_matrix(x: Tensor, m: Tensor) -> Tensor:
    """x (B, H, n, D) in natural order (HF's q / k, laid out (B, n, H, D)), m (B, n, D, D) from
    ``rotation_matrix``: x rotated, in pair order, (B, H, n, D) laid out (B, n, H, D)."""
    return (x.transpose(1, 2) @ m).transpose(1, 2)


def apply_rotation(x: Tensor, factor: Any) -> Tensor:
    """x (..., D/2, 2) in pair order, rotated by a ``rotation`` factor broadcastable to (..., D/2)."""
    if isinstance(factor, Tensor):
        return torch.view_as_real(torch.view_as_complex(x) * factor)
    c, s = factor
    x1, x2 = x.unbind(-1)
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's RoPE, x * cos + rotate_half(x) * sin, with x in pair order: x (..., D/2, 2) -> the
    same shape; cos, sin (..., D) broadcastable."""
    return apply_rotation(x, rotation(cos, sin))



def rotate_plain(x: Tensor, factor: Any) -> Tensor:
    """RoPE'd plain tokens, one slot each: x (B, H, n, D) in pair order, factor (B, 1, n, D/2)."""
    B, H, n, D = x.shape
    return apply_rotation(x.reshape(B, H, n, D // 2, 2), factor).view(B, H, n, D)

