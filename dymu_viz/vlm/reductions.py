"""The matched-budget baselines as pure reductions of a tower's patches: ToMe with a fixed r and
uniform 2-D average pooling (``baselines.match_budget`` sizes them to DyMU's mean count).

Both are merges with a known partition of the patches, so they run through the same LLM path
as DyMU: ``patch_vlm(model, ToMe(...) | Pool(...), mode="vtu" | "compact")``. VTU then shows
each pooled / merged token at every patch position it covers; "compact" puts it at its first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

KINDS = ("tome", "pool")


@dataclass(frozen=True)
class ToMe:
    """ToMe with fixed r: r[i] merges in tower layer i (after ``vision_feature_layer`` ignored;
    missing layers merge nothing). A single value, ``ToMe((21,))``, is ToMe's usual setting: r
    merges in every layer the LLM reads (``per_layer``). measured: the mean image tokens
    ``match_budget`` measured with it."""

    r: tuple[int, ...]
    measured: Optional[float] = field(default=None, compare=False)

    def per_layer(self, layers_read: int, depth: int) -> list[int]:
        """r of each of the tower's ``depth`` layers when the LLM reads the first ``layers_read``."""
        if len(self.r) == 1:
            return [self.r[0] if i < layers_read else 0 for i in range(depth)]
        if len(self.r) > depth:
            raise ValueError(f"ToMe gives r for {len(self.r)} layers but the tower has {depth}")
        return list(self.r) + [0] * (depth - len(self.r))


@dataclass(frozen=True)
class Pool:
    """Average pooling of each crop's side x side patch grid to rows x cols cells (bins of
    floor / ceil(side / rows) patches; exactly ``avg_pool2d`` when rows and cols divide side).
    measured: as for ``ToMe``."""

    rows: int
    cols: int
    measured: Optional[float] = field(default=None, compare=False)


Baseline = Union[ToMe, Pool]


def pool_groups(side: int, rows: int, cols: int, device: torch.device) -> Tensor:
    """(side * side,) the cell of every patch of a raster side x side grid; cells raster too."""
    if not (1 <= rows <= side and 1 <= cols <= side):
        raise ValueError(f"cannot pool a {side} x {side} patch grid to {rows} x {cols} cells")
    i = torch.arange(side, device=device)
    return ((i * rows // side)[:, None] * cols + (i * cols // side)[None, :]).flatten()


def pool_patches(patches: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """(B, side^2, C) patch tokens -> (B, rows * cols, C) cell means and the cell of each patch
    (side^2,). Means are taken in at least float32."""
    B, n, C = patches.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"pooling needs a square patch grid, got {n} patches")
    groups = pool_groups(side, rows, cols, patches.device)
    wide = patches.to(torch.promote_types(patches.dtype, torch.float32))
    sums = wide.new_zeros((B, rows * cols, C)).index_add_(1, groups, wide)
    counts = torch.bincount(groups, minlength=rows * cols).to(wide.dtype)
    return (sums / counts[:, None]).to(patches.dtype), groups


def pool_grids(side: int) -> list[tuple[int, int]]:
    """Pooling grids (rows, cols) for a side x side patch grid, most cells first: every grid
    whose cells are at most 1.5 times longer one way than the other (or differ by one), so the
    cell count steps finely enough to match a budget; of equal counts the squarest."""
    grids = [(r, c) for r in range(1, side + 1) for c in range(1, side + 1)
             if abs(r - c) <= 1 or max(r, c) <= 1.5 * min(r, c)]
    return sorted(grids, key=lambda g: (-g[0] * g[1], abs(g[0] - g[1]), -g[0]))


def tome_r(merges: int, layers_run: int, depth: int) -> tuple[int, ...]:
    """``merges`` ToMe merges per crop spread evenly over the first ``layers_run`` of ``depth``
    layers (the remainder one more each in the earliest layers); later layers merge nothing."""
    base, extra = divmod(max(merges, 0), max(layers_run, 1))
    return tuple(base + (i < extra) if i < layers_run else 0 for i in range(depth))
