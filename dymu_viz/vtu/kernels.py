"""VTU's tensor kernels, pure functions: compact rows gathered to virtual slots (and rotated),
copies averaged back, the exact Eq. 10 scores, the causal / window mask over virtual positions,
SDPA on a route that keeps a fused kernel (each call counted in ``routes``), GQA products.

Shapes: B samples, H query heads, Hkv key / value heads, P compact tokens, V virtual slots, D
head dim.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import VirtualLayout
from .rope import pair_order, rotate


def _flat_index(src: Tensor, n_rows: int) -> Tensor:
    """(B, V) per-sample row indices -> (B * V,) indices into the B * n_rows stacked rows."""
    return (src + n_rows * torch.arange(src.shape[0], device=src.device)[:, None]).reshape(-1)


def gather_slots(x: Tensor, src: Tensor) -> Tensor:
    """(B, H, P, D) compact rows -> (B, H, V, D) virtual slots, src: (B, V); one pass.

    HF's fresh q / k / v are (B, P, H, D) tensors seen as (B, H, P, D): one row copy of H * D
    values per slot, the result laid out (B, V, H, D), which SDPA takes as it is. A cache's
    tensors are (B, H, P, D): one row copy of D values per head and slot, the result laid out
    (B, H, V, D) like the cache, so that products with it need no further copy."""
    B, H, P, D = x.shape
    if x.transpose(1, 2).is_contiguous():
        rows, index = x.transpose(1, 2).reshape(B * P, H * D), _flat_index(src, P)
        return rows.index_select(0, index).view(B, -1, H, D).transpose(1, 2)
    heads = torch.arange(B * H, device=src.device).view(B, H, 1) * P
    index = (heads + src[:, None, :]).reshape(-1)  # (B, H, V) rows
    return x.reshape(B * H * P, D).index_select(0, index).view(B, H, -1, D)


def gather_rotated(x: Tensor, src: Tensor, cos: Tensor, sin: Tensor, pair_ordered: bool = False) -> Tensor:
    """RoPE'd virtual slots of compact q or k: x (B, H, P, D) -> (B, H, V, D); src (B, V);
    cos, sin (B, V, D) per slot.

    The result has each head's dims in pair order (x_0, x_{D/2}, x_1, x_{D/2+1}, ...): a
    permutation of the head dim shared by q and k, so every q . k (and SDPA) is unchanged.
    pair_ordered: x is already in pair order (what VTU's RoPE hook hands over, cache included);
    otherwise it is put in pair order first, one copy at compact length. Then the virtual
    slots take one gather and one complex multiply instead of a gather and three RoPE passes."""
    B, H, P, D = x.shape
    if not pair_ordered:
        x = pair_order(x).flatten(-2)
    slots = gather_slots(x, src)  # (B, H, V, D), laid out (B, V, H, D) or (B, H, V, D)
    V = slots.shape[2]
    if slots.is_contiguous():  # a cache's rows: rotate in the (B, H, V, D) layout
        return rotate(slots.view(B, H, V, D // 2, 2), cos[:, None], sin[:, None]).view(B, H, V, D)
    pairs = slots.transpose(1, 2).view(B, V, H, D // 2, 2)
    return rotate(pairs, cos[:, :, None], sin[:, :, None]).view(B, V, H, D).transpose(1, 2)



def average_copies(out: Tensor, src: Tensor, valid: Tensor, n_rows: int, backend: str = "native") -> Tensor:
    """Mean of the virtual slots of each compact row: (B, H, V, D) -> (B, n_rows, H, D), the
    layout HF's attention output takes. src: (B, V) target row of each slot; valid: (B, V)
    False for padding slots, which are sent to a dropped extra row. backend "torch_scatter"
    uses torch_scatter.scatter_mean (optional dependency)."""
    B, H, V, D = out.shape
    index = torch.where(valid.reshape(-1), _flat_index(src, n_rows), B * n_rows)
    rows = out.transpose(1, 2).reshape(B * V, H * D)
    if backend == "torch_scatter":
        from torch_scatter import scatter_mean
        mean = scatter_mean(rows, index, dim=0, dim_size=B * n_rows + 1)
    else:
        summed = rows.new_zeros((B * n_rows + 1, H * D)).index_add_(0, index, rows)
        counts = torch.bincount(index, minlength=B * n_rows + 1).clamp_min(1)
        mean = summed / counts.to(rows.dtype)[:, None]
    return mean[:-1].view(B, n_rows, H, D)


def exact_scores(q: Tensor, k: Tensor, q_src: Tensor, k_src: Tensor, cos_q: Tensor, sin_q: Tensor,
                 cos_k: Tensor, sin_k: Tensor) -> Tensor:
    """Paper Eq. 10: RoPE scores of the virtual sequence from *unique* q / k products.

    q: (B, H, Pq, D), k: (B, H, Pk, D) un-rotated; *_src: (B, Vq) / (B, Vk) slot -> row;
    cos/sin: (B, V, D) per slot. With pairs (x1, x2) = halves of D and angle difference
    a = theta_m - theta_n per frequency, score = sum_d (q1 k1 + q2 k2) cos a + (q1 k2 - q2 k1) sin a.
    Materialises (B, H, Vq, Vk, D/2): a reference kernel, not a fast one. Returns (B, H, Vq, Vk).
    """
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    dot = q1[:, :, :, None] * k1[:, :, None] + q2[:, :, :, None] * k2[:, :, None]  # (B, H, Pq, Pk, D/2)
    cross = q1[:, :, :, None] * k2[:, :, None] - q2[:, :, :, None] * k1[:, :, None]
    B, H, Pq, Pk, half = dot.shape
    rows = q_src[:, None, :, None, None].expand(B, H, -1, Pk, half)
    dot, cross = dot.gather(2, rows), cross.gather(2, rows)
    cols = k_src[:, None, None, :, None].expand(B, H, dot.shape[2], -1, half)
    dot, cross = dot.gather(3, cols), cross.gather(3, cols)
    cq, sq = cos_q[..., :half][:, None, :, None], sin_q[..., :half][:, None, :, None]  # (B, 1, Vq, 1, D/2)
    ck, sk = cos_k[..., :half][:, None, None], sin_k[..., :half][:, None, None]  # (B, 1, 1, Vk, D/2)
    return (dot * (cq * ck + sq * sk) + cross * (sq * ck - cq * sk)).sum(-1)


def allowed_slots(layout: VirtualLayout, q_pos: Tensor, q_valid: Tensor, window: Optional[int] = None) -> Tensor:
    """(B, 1, Vq, V) bool: a query slot sees valid key slots at positions <= its own (and, with a
    sliding window, > its own - window: HF's rule, on virtual positions). Padding query slots see
    everything (their outputs are dropped) so no softmax row is empty."""
    behind = q_pos[:, None, :, None] - layout.pos[:, None, None, :]
    allowed = layout.valid[:, None, None, :] & (behind >= 0)
    if window is not None:
        allowed &= behind < window
    return allowed | ~q_valid[:, None, :, None]


def sdpa(routes: Counter[str], q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False,
         allowed: Optional[Tensor] = None) -> Tensor:
    """SDPA over the virtual slots, on a path that keeps a fused kernel (route counted):

    * "causal" / "no_mask": no mask tensor (``allowed`` None; causal or not), GQA native
      (``enable_gqa``);
    * "mask_repeat_kv" / "mask": the boolean mask ``allowed`` (B, 1, Vq, V); with GQA, K / V are
      repeated per query head first, because SDPA given both a mask and ``enable_gqa`` falls
      back to the math kernel, which materialises (B, H, Vq, V)."""
    groups = q.shape[1] // k.shape[1]
    if allowed is None:
        routes["causal" if causal else "no_mask"] += 1
        gqa = {"enable_gqa": True} if groups > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    routes["mask_repeat_kv" if groups > 1 else "mask"] += 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def grouped(a: Tensor, b: Tensor, groups: int, scale: float = 1.0) -> Tensor:
    """a (B, H, M, K) @ b (B, Hkv, K, N), times scale, with H = Hkv * groups (GQA), without
    repeating b: one batched product over the B * Hkv key / value heads."""
    B, H, M, K = a.shape
    Hkv, N = b.shape[1], b.shape[-1]
    a3, b3 = a.reshape(B * Hkv, groups * M, K), b.reshape(B * Hkv, K, N)
    if scale == 1.0:
        return torch.bmm(a3, b3).view(B, H, M, N)
    return torch.baddbmm(a3.new_empty(()), a3, b3, beta=0, alpha=scale).view(B, H, M, N)



def onto_compact_values(routes: Counter[str], probs: Tensor, slot_index: Tensor, value: Tensor, groups: int) -> Tensor:
    """probs (B, H, n, V) over the virtual slots, summed into the compact rows the slots copy
    (slot_index: (B, H, n, V) compact row of each slot), times the compact values (B, Hkv, P, D):
    (B, H, n, D). No value is expanded (route "slot_probabilities")."""
    routes["slot_probabilities"] += 1
    compact = probs.new_zeros((*probs.shape[:3], value.shape[2])).scatter_add_(-1, slot_index, probs)
    return grouped(compact, value, groups)


def merge_copies(out: Tensor, q_src: Tensor, q_valid: Tensor, q_len: int, backend: str, plain: bool) -> Tensor:
    """(B, H, slots, D) -> (B, q_len, H, D): copies averaged, or, for plain tokens (one slot each,
    in order), the slots themselves."""
    return out.transpose(1, 2) if plain else average_copies(out, q_src, q_valid, q_len, backend)

