"""One generic merging ViT loop, shared by every model family.

An adapter (see ``dymu_viz.adapters``) says where a family keeps its pieces; this module runs
them:

    embed -> for each block:  q, k, v = qkv(norm1(x))
                              x = x + ls1(proj(SDPA(q, k, v, bias = log size + padding)))
                              merge (DToMe / ToMe / calibration) using k averaged over heads
                              x = x + ls2(mlp(norm2(x)))
          -> the family's own pooling / output, made aware of sizes and padding.

Proportional attention is an additive float mask ``log(size)`` on keys (finfo.min on padding)
given to ``scaled_dot_product_attention`` before the softmax. Until a first merge happens the
mask is omitted, so with merging off the kernels are those of the unpatched model. Once images
have different lengths, the position-wise parts (norms, projections, MLP) run on the valid
tokens only; just the attention itself sees the padded layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import merge

MODES = ("off", "threshold", "fixed_r", "calibrate")


@dataclass
class BlockParts:
    """The pieces of one pre-norm transformer block, all position-wise: ``qkv`` maps (..., C)
    to (..., 3, heads, head_dim); ``proj`` maps (..., heads*head_dim) to (..., C).
    ls1 / ls2 are layer-scales (None when the block has none)."""

    norm1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], Tensor]
    proj: Callable[[Tensor], Tensor]
    norm2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    ls1: Optional[Callable[[Tensor], Tensor]] = None
    ls2: Optional[Callable[[Tensor], Tensor]] = None


@dataclass
class MergeConfig:
    """What every layer does. ``values[i]`` is tau_i (threshold), r_i (fixed_r, calibrate)."""

    mode: str = "off"
    thresholds: Optional[list[float]] = None  # per layer, threshold mode
    r: Optional[list[int]] = None  # per layer; in threshold mode r_i = 0 disables layer i

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown merge mode {self.mode!r}; choose one of {', '.join(MODES)}")

    def check_depth(self, layers: int, family: str) -> None:
        for name, values in (("thresholds", self.thresholds), ("r", self.r)):
            if values is not None and len(values) != layers:
                raise ValueError(
                    f"{len(values)} {name} given but the {family} encoder has {layers} layers; "
                    f"give exactly one value per layer (calibrate thresholds for this model)")
        if self.thresholds is not None and any(t != t for t in self.thresholds):
            raise ValueError("a threshold is NaN; thresholds must be numbers (use inf to disable a layer)")

    def select(self, i: int, best: Tensor, size: Tensor, protected: int) -> tuple[Optional[Tensor], Optional[float]]:
        """Edges to merge at layer i: (src (B, Na) bool or None, batch threshold or None)."""
        r_i = self.r[i] if self.r is not None else None
        if self.mode == "off" or r_i == 0:
            return None, None
        if self.mode == "threshold":
            return merge.select_threshold(best, size, self.thresholds[i], protected), None
        if self.mode == "fixed_r":
            return merge.select_fixed_r(best, size, r_i, protected), None
        return merge.select_batch_top(best, size, r_i, protected)


@dataclass
class EncoderResult:
    """Everything DToMe knows about one encoder call, per image.

    tokens: (B, N, C) output of the last block (padded; before any final norm);
    sizes: (B, N) patches per token, 0 on padding; groups: (B, N0) row of every original token;
    counts: (B, L+1) valid tokens after the embedding and after every block;
    layer_sizes / layer_groups: the same after every block (L+1 entries, first = input);
    hidden_states: L+1 padded (B, N_l, C) block outputs when requested, else None;
    pooled: the model's pooled output (None where the family has none);
    batch_thresholds: per layer, the calibration value of this batch (calibrate mode);
    margins: (B, L) threshold mode: per image and block, the distance of the edge score closest
    to that block's threshold (``merge.threshold_margin``; +inf where the block compared no
    edge). Rounding differences smaller than an image's smallest margin (another CPU's kernels,
    another batch) cannot change which of its edges beat a threshold; None in other modes.
    patch_size: (ph, pw) pixels per patch, so a map can place the grid on the picture (set by
    the adapter that ran the encoder).
    """

    tokens: Tensor
    sizes: Tensor
    groups: Tensor
    counts: Tensor
    layer_sizes: list[Tensor]
    layer_groups: list[Tensor]
    protected: int
    grid: tuple[int, int]
    hidden_states: Optional[tuple[Tensor, ...]] = None
    pooled: Optional[Tensor] = None
    batch_thresholds: list[Optional[float]] = field(default_factory=list)
    margins: Optional[Tensor] = None
    patch_size: Optional[tuple[int, int]] = None

    @property
    def padding_mask(self) -> Tensor:
        """(B, N) bool, True on padding slots."""
        return self.sizes == 0

    @property
    def n_tokens(self) -> Tensor:
        """(B,) valid output tokens per image."""
        return self.counts[:, -1]

    def select(self, b: int) -> "EncoderResult":
        """The result of image b alone (a batch of one, padding of the batch kept)."""
        one = slice(b, b + 1)
        return replace(
            self, tokens=self.tokens[one], sizes=self.sizes[one], groups=self.groups[one], counts=self.counts[one],
            layer_sizes=[s[one] for s in self.layer_sizes], layer_groups=[g[one] for g in self.layer_groups],
            hidden_states=None if self.hidden_states is None else tuple(h[one] for h in self.hidden_states),
            pooled=None if self.pooled is None else self.pooled[one],
            margins=None if self.margins is None else self.margins[one])

    def image_tokens(self, b: int) -> Tensor:
        """(n_b, C) the valid output tokens of image b."""
        return self.tokens[b, : int(self.counts[b, -1])]

    def layer_padding_mask(self, layer: int) -> Tensor:
        return self.layer_sizes[layer] == 0

    def membership(self, layer: int = -1) -> Tensor:
        """Dense (B, N_l, N0) 0/1 provenance at a layer (0 = input, -1 = last)."""
        return merge.membership(self.layer_groups[layer], self.layer_sizes[layer].shape[1])

    def patch_groups(self, layer: int = -1) -> Tensor:
        """(B, gh, gw) group id of every image patch (protected tokens dropped), for maps."""
        groups = self.layer_groups[layer][:, self.protected:]
        return groups.reshape(groups.shape[0], *self.grid)


def attention_bias(size: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, 1, 1, N) additive mask: log(size) on valid keys, the most negative value on padding."""
    s = size.to(torch.promote_types(dtype, torch.float32))
    bias = torch.where(s > 0, s.clamp_min(1).log(), torch.finfo(dtype).min)
    return bias.to(dtype)[:, None, None, :]


def weighted_mean(x: Tensor, size: Tensor) -> Tensor:
    """Mean over original patches: size-weighted mean of (B, N, C) tokens; padding weighs 0."""
    w = size.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1e-6)


def valid_rows(size: Tensor, padded: Optional[bool] = None) -> Optional[Tensor]:
    """Flat (B*N) indices of the valid tokens, or None when nothing is padded (``padded``: whether
    anything is, when the caller knows; else a host sync finds out)."""
    valid = size > 0
    if padded is None:
        padded = not bool(valid.all())
    return valid.flatten().nonzero().squeeze(1) if padded else None


def rowwise(fn: Callable[[Tensor], Tensor], x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Apply a position-wise fn to (B, N, C) x on its valid rows only (zeros on padding), so
    padded batches spend no norm / projection / MLP work on padding. (B, N, *fn's trailing)."""
    if rows is None:
        return fn(x)
    flat = x.flatten(0, 1)
    y = fn(flat.index_select(0, rows))
    out = y.new_zeros((flat.shape[0], *y.shape[1:])).index_copy_(0, rows, y)
    return out.view(*x.shape[:2], *y.shape[1:])


def attention_branch_out(blk: BlockParts, a: Tensor) -> Tensor:
    a = blk.proj(a)
    return blk.ls1(a) if blk.ls1 is not None else a


def mlp_branch(blk: BlockParts, x: Tensor) -> Tensor:
    m = blk.mlp(blk.norm2(x))
    return blk.ls2(m) if blk.ls2 is not None else m


def run_blocks(x: Tensor, blocks: Sequence[BlockParts], config: MergeConfig, protected: int,
               grid: tuple[int, int], output_hidden_states: bool = False) -> EncoderResult:
    """Run the transformer blocks on embedded tokens x: (B, N0, C) with merging."""
    B, N0, _ = x.shape
    size = torch.ones((B, N0), dtype=torch.float32, device=x.device)
    groups = torch.arange(N0, device=x.device).expand(B, N0).contiguous()
    layer_sizes, layer_groups = [size], [groups]
    hidden = [x] if output_hidden_states else None
    batch_thresholds: list[Optional[float]] = []
    margins = torch.full((B, len(blocks)), torch.inf, device=x.device, dtype=merge.score_dtype(x.dtype)) \
        if config.mode == "threshold" else None
    merged, rows = False, None
    for i, blk in enumerate(blocks):
        qkv = rowwise(lambda t: blk.qkv(blk.norm1(t)), x, rows)  # (B, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, head_dim) each
        bias = attention_bias(size, q.dtype) if merged else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
        x = x + rowwise(lambda t: attention_branch_out(blk, t), a, rows)

        src, tau = None, None
        if config.mode != "off" and x.shape[1] - protected >= 2:  # the longest image can still merge
            best, dst = merge.bipartite_scores(k.mean(1), size, protected)
            src, tau = config.select(i, best, size, protected)
            if margins is not None and src is not None:
                margins[:, i] = merge.threshold_margin(best, config.thresholds[i])
        batch_thresholds.append(tau)
        if src is not None:  # one host sync per layer: the token counts decide the next shapes
            kept = merge.survivor_counts(src, size)
            merges, longest, shortest = torch.stack([src.any().long(), kept.max(), kept.min()]).tolist()
            if merges:
                x, size, groups = merge.merge_tokens(x, size, groups, src, dst, best, protected, n_new=longest)
                merged, rows = True, valid_rows(size, padded=shortest < longest)

        x = x + rowwise(lambda t: mlp_branch(blk, t), x, rows)
        layer_sizes.append(size)
        layer_groups.append(groups)
        if hidden is not None:
            hidden.append(x)
    counts = torch.stack([(s > 0).sum(-1) for s in layer_sizes], dim=1)
    return EncoderResult(
        tokens=x, sizes=size, groups=groups, counts=counts, layer_sizes=layer_sizes,
        layer_groups=layer_groups, protected=protected, grid=grid,
        hidden_states=tuple(hidden) if hidden is not None else None,
        batch_thresholds=batch_thresholds if config.mode == "calibrate" else [], margins=margins,
    )
