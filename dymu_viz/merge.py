"""Bipartite token matching and size-weighted merging: pure tensor functions.

Shapes: B images, N current tokens (padded to the longest image), C channels, N0 original
tokens, Na = ceil(N/2) "A" tokens (even slots), Nb = N//2 "B" tokens (odd slots).

Conventions shared by every path (fixed r, threshold, calibration; one image or a batch):

* Each image's valid tokens form a prefix of its row; padding follows. A padding slot has
  ``size == 0``, so ``valid = size > 0`` and no separate mask has to be kept in sync.
* ``protected`` leading tokens (1 for a CLS token, else 0) are never sources; they are A
  tokens (slot 0), so they are never destinations either.
* The reference's token order (spec section 2.6): an image that merges in a layer becomes
  [protected, unmerged A tokens, all B tokens]; the unmerged A tokens are in slot order when
  a CLS token is protected and in descending best-edge score (ties by slot) when none is; the
  B tokens keep slot order and absorb their sources. An image that merges nothing keeps its
  rows untouched. The order depends only on the image itself, never on the batch, and it
  matters: the next layer's even / odd split is taken on it.
* Provenance is a group id per original token: ``groups[b, p]`` is the row that original
  token ``p`` lives in now. Images of different original sizes in one batch (Qwen's dynamic
  resolution) pad their originals too: a padded original's group is N, one past the last row,
  and stays one past it. The dense 0/1 membership matrix is built only on demand.
"""

from __future__ import annotations

import torch
from torch import Tensor


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Matching and merging run in at least float32 (bf16 scores tie far too often)."""
    return torch.promote_types(dtype, torch.float32)


def bipartite_scores(metric: Tensor, size: Tensor, protected: int = 0) -> tuple[Tensor, Tensor]:
    """Best B partner of every A token by cosine similarity.

    metric: (B, N, C) similarity features (keys averaged over heads); size: (B, N), 0 = padding.
    Returns best: (B, Na) edge scores (-inf for protected and padded A slots, or when the
    image has no valid B token) and dst: (B, Na) index of the chosen B token.
    """
    m = metric.to(score_dtype(metric.dtype))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # padding rows are all zero
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # (B, Na, Nb)
    valid = size > 0
    scores = scores.masked_fill(~valid[:, 1::2, None].transpose(1, 2), -torch.inf)
    scores = scores.masked_fill(~valid[:, ::2, None], -torch.inf)
    scores[:, :protected] = -torch.inf
    if scores.shape[-1] == 0:  # a single token: no B side at all
        return scores.new_full(scores.shape[:2], -torch.inf), scores.new_zeros(scores.shape[:2], dtype=torch.long)
    best, dst = scores.max(dim=-1)
    return best, dst


def merge_cap(size: Tensor, protected: int) -> Tensor:
    """Most merges an image may make in one layer: floor((n_valid - protected) / 2). (B,)"""
    n_valid = (size > 0).sum(-1)
    return (n_valid - protected).clamp_min(0) // 2


def edge_ranks(best: Tensor) -> Tensor:
    """Rank of each A edge inside its image, 0 = best score; ties broken by slot. (B, Na)"""
    order = best.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(best.shape[-1], device=best.device).expand_as(order))


def select_fixed_r(best: Tensor, size: Tensor, r: int, protected: int) -> Tensor:
    """ToMe: the r best edges of every image (capped). Returns src: (B, Na) bool."""
    cap = merge_cap(size, protected).clamp_max(max(r, 0))
    return (edge_ranks(best) < cap[:, None]) & torch.isfinite(best)


def select_threshold(best: Tensor, size: Tensor, tau: float, protected: int) -> Tensor:
    """DToMe inference: every edge scoring strictly above tau, capped per image. (B, Na) bool."""
    cap = merge_cap(size, protected)
    return (best > tau) & (edge_ranks(best) < cap[:, None])


def threshold_margin(best: Tensor, tau: float) -> Tensor:
    """How close each image's closest edge came to the threshold: min |best - tau| over its
    valid A edges (+inf when it has none). (B,) in the scores' dtype. An edge whose score
    rounds differently on another machine (other CPU kernels, another batch shape) by less
    than this cannot change its side of the strict ``>``."""
    return (best - tau).abs().masked_fill(~torch.isfinite(best), torch.inf).amin(-1)


def select_batch_top(best: Tensor, size: Tensor, r: int, protected: int,
                     total: int | None = None) -> tuple[Tensor, float | None]:
    """Calibration: the B*r best edges of the whole batch (spec section 3.2), or the ``total``
    best when given (images of different sizes: a share of all their tokens).

    r is first capped by the longest image's merge cap, as in the reference. Padded and
    protected slots (score -inf) are never picked. Returns src: (B, Na) bool and the batch
    threshold: the score of the best edge *not* picked, clamped to >= 0. When every valid edge
    was picked the batch asks for all of them: 0, the clamp (as the reference, whose unpicked
    edges are then padding); None only when the batch had no valid edge at all.
    """
    r = min(r, int(merge_cap(size, protected).max()))
    flat = best.flatten()
    n_edges = int(torch.isfinite(flat).sum())
    k = min(best.shape[0] * max(r, 0) if total is None else max(total, 0), n_edges)
    order = flat.argsort(descending=True, stable=True)
    src = torch.zeros_like(flat, dtype=torch.bool)
    src[order[:k]] = True
    tau = max(float(flat[order[k]]), 0.0) if k < n_edges else (0.0 if n_edges else None)
    return src.view_as(best), tau


def survivor_rows(src: Tensor, best: Tensor, size: Tensor, protected: int) -> Tensor:
    """New row of every surviving slot in the reference order; -1 for sources and padding.

    src, best: (B, Na) from the selection and bipartite_scores; size: (B, N). Returns (B, N).
    Rows of an image that merges: [protected, unmerged A (by slot with a CLS token, else by
    descending score, ties by slot), B tokens by slot]. An image that merges nothing: its slots.
    """
    valid = size > 0
    keep_a = valid[:, ::2] & ~src  # (B, Na) unmerged A tokens, the protected ones included
    valid_b = valid[:, 1::2]  # (B, Nb)
    if protected:
        a_row = keep_a.long().cumsum(-1) - 1  # slot order: protected slot 0 comes first
    else:  # descending score: the k-th best kept A token goes to row k
        by_rank = best.argsort(dim=-1, descending=True, stable=True)  # (B, Na) A slots, best first
        a_row = torch.empty_like(by_rank).scatter_(-1, by_rank, keep_a.gather(-1, by_rank).long().cumsum(-1) - 1)
    b_row = keep_a.sum(-1, keepdim=True) + valid_b.long().cumsum(-1) - 1
    rows = torch.full_like(size, -1, dtype=torch.long)
    rows[:, ::2] = torch.where(keep_a, a_row, -1)
    rows[:, 1::2] = torch.where(valid_b, b_row, -1)
    unchanged = torch.where(valid, torch.arange(size.shape[1], device=size.device), -1)
    return torch.where(src.any(-1, keepdim=True), rows, unchanged)


def survivor_counts(src: Tensor, size: Tensor) -> Tensor:
    """Tokens each image keeps after merging the selected sources src (B, Na): (B,). Every
    selection picks valid A slots only (padding scores -inf), so this is valid - sources."""
    return (size > 0).sum(-1) - src.sum(-1)


def merge_tokens(x: Tensor, size: Tensor, groups: Tensor, src: Tensor, dst: Tensor, best: Tensor,
                 protected: int, n_new: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Size-weighted merge of every selected A token into its B partner, in the reference order.

    x: (B, N, C); size: (B, N); groups: (B, N0); src, best, dst: (B, Na) from the selection and
    bipartite_scores. Returns x: (B, N', C), size: (B, N'), groups: (B, N0) with
    N' = the largest surviving count, ``survivor_counts(src, size).max()``, which a caller that
    already read it passes as n_new (no host sync here then). Padded originals: N in, N' out.
    Features are averaged in at least float32.
    """
    B, N, C = x.shape
    pos = survivor_rows(src, best, size, protected)  # (B, N), -1 = not a survivor
    survive = pos >= 0
    if n_new is None:
        n_new = int(survive.sum(-1).max())
    dump = n_new  # one scratch row that collects padding; dropped below
    keep = torch.where(survive, pos, dump)
    dst_row = keep[:, 1::2].gather(1, dst)  # (B, Na): new row of each A token's partner
    target = keep.clone()
    target[:, ::2] = torch.where(src, dst_row, keep[:, ::2])

    # Each destination keeps its own value and gains sum_u s_u (x_u - x_dst) / new_size: the
    # size-weighted mean, and rows that receive nothing stay bitwise unchanged.
    wdtype = score_dtype(x.dtype)
    xw = x.to(wdtype)
    base = xw.new_zeros((B, n_new + 1, C)).scatter_(1, keep[..., None].expand(B, N, C), xw)
    index = target[..., None].expand(B, N, C)
    delta = (xw - base.gather(1, index)) * size.to(wdtype)[..., None]
    gained = torch.zeros_like(base).scatter_add_(1, index, delta)
    new_size = size.new_zeros((B, n_new + 1)).scatter_add_(1, target, size)
    new_x = base[:, :n_new] + gained[:, :n_new] / new_size[:, :n_new, None].clamp_min(1).to(wdtype)
    target = torch.cat([target, target.new_full((B, 1), dump)], 1)  # padded originals (group N) -> N'
    return new_x.to(x.dtype), new_size[:, :n_new], target.gather(1, groups)


def membership(groups: Tensor, n_rows: int) -> Tensor:
    """Dense provenance: (B, n_rows, N0) 0/1 matrix, [b, j, p] = 1 iff token p is in row j."""
    B, N0 = groups.shape
    dense = groups.new_zeros((B, n_rows, N0))
    return dense.scatter_(1, groups[:, None, :], 1)


def unmerge(x: Tensor, groups: Tensor) -> Tensor:
    """Copy every merged token back to each original slot it covers: (B, N, C) -> (B, N0, C)."""
    return x.gather(1, groups[..., None].expand(-1, -1, x.shape[-1]))
