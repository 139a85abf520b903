"""The matched-budget baselines as pure reductions of a grid of tokens -- a tower's patches,
or the units that families merging after their tower merge in rounds: ToMe with a fixed r,
uniform 2-D average pooling and random pruning (``baselines.match_budget`` sizes them to DyMU's
mean count).

Each gives a partition of the patches with one token per part, so they run through the same LLM
path as DyMU: ``patch_vlm(model, ToMe(...) | Pool(...) | RandomPrune(...), mode="vtu" |
"compact")``. VTU then shows each token at every patch position of its part; "compact" puts it
at the part's first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import zlib
from typing import Optional, Union

import torch
from torch import Tensor

KINDS = ("tome", "pool", "random")


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


@dataclass(frozen=True)
class RandomPrune:
    """Random pruning: ``keep`` of each crop's patches, drawn uniformly without replacement,
    keep their own features and the others are dropped (the LLM sees ``keep`` patch tokens per
    crop). Each dropped patch's position is given to its nearest kept patch (grid distance, ties
    to the earlier), so VTU shows a kept token over its Voronoi cell of the grid; "compact" puts
    it at its cell's first position. The draw is seeded by ``seed`` and the crop's own pixels:
    the same crop keeps the same patches in any batch. measured: as for ``ToMe``."""

    keep: int
    seed: int = 0
    measured: Optional[float] = field(default=None, compare=False)


Baseline = Union[ToMe, Pool, RandomPrune]
BASELINES = (ToMe, Pool, RandomPrune)


def grid_shape(grid: Union[int, tuple[int, int]]) -> tuple[int, int]:
    """(rows, columns) of a grid given as its side (square) or as both."""
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def pool_groups(grid: Union[int, tuple[int, int]], rows: int, cols: int, device: torch.device) -> Tensor:
    """(h * w,) the cell of every patch of a raster h x w grid (``grid``: h = w = side, or
    (h, w)); cells raster too."""
    h, w = grid_shape(grid)
    if not (1 <= rows <= h and 1 <= cols <= w):
        raise ValueError(f"cannot pool a {h} x {w} patch grid to {rows} x {cols} cells")
    return ((torch.arange(h, device=device) * rows // h)[:, None] * cols +
            (torch.arange(w, device=device) * cols // w)[None, :]).flatten()


def cell_means(x: Tensor, groups: Tensor, cells: int) -> Tensor:
    """(..., n, C) tokens -> (..., cells, C) the mean of each cell's (``groups``: (n,) the cell of
    each token), taken in at least float32."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    sums = wide.new_zeros((*x.shape[:-2], cells, x.shape[-1])).index_add_(-2, groups, wide)
    return (sums / torch.bincount(groups, minlength=cells).to(wide.dtype)[:, None]).to(x.dtype)


def pool_patches(patches: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """(B, side^2, C) patch tokens -> (B, rows * cols, C) cell means and the cell of each patch
    (side^2,)."""
    n = patches.shape[1]
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"pooling needs a square patch grid, got {n} patches")
    groups = pool_groups(side, rows, cols, patches.device)
    return cell_means(patches, groups, rows * cols), groups


def reduce_grid(x: Tensor, grid: tuple[int, int], reduction: Union["Pool", "RandomPrune"],
                pixels: Tensor) -> tuple[Tensor, Tensor]:
    """A pooling or random-pruning baseline on one h x w grid of tokens x (h * w, D), raster:
    its tokens (n, D) and the part of every grid token (h * w,). pixels: what seeds the random
    draw (the grid's own pixels, so it is the same alone or in any batch)."""
    if isinstance(reduction, Pool):
        groups = pool_groups(grid, reduction.rows, reduction.cols, x.device)
        return cell_means(x, groups, reduction.rows * reduction.cols), groups
    kept, parts = random_keep(grid, reduction.keep, crop_seed(reduction.seed, pixels), x.device)
    return x[kept], parts


def crop_seed(seed: int, pixels: Tensor) -> int:
    """A 63-bit seed from ``seed`` and the bytes of one crop's pixels (any dtype, any device)."""
    data = pixels.detach().contiguous().cpu().flatten().view(torch.uint8).numpy().tobytes()
    return (seed * 0x9E3779B1 + zlib.crc32(data)) % (1 << 63)


def random_keep(grid: Union[int, tuple[int, int]], keep: int, seed: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``keep`` patches of a raster h x w grid (``grid``: its side, or (h, w)) drawn with
    ``seed``: their indices (keep,), ascending, and the part of every patch (h * w,) -- the rank
    of its nearest kept patch."""
    h, w = grid_shape(grid)
    if not 1 <= keep <= h * w:
        raise ValueError(f"random pruning keeps 1 to {h * w} of a {h} x {w} patch grid, got {keep}")
    generator = torch.Generator().manual_seed(seed)
    kept = torch.randperm(h * w, generator=generator)[:keep].sort().values.to(device)
    i = torch.arange(h * w, device=device)
    rows, cols = i // w, i % w
    distance = (rows[:, None] - rows[kept][None]) ** 2 + (cols[:, None] - cols[kept][None]) ** 2  # (h * w, keep)
    return kept, distance.argmin(1)  # argmin returns the first of equal minima


def check_reduction(reduction: "Baseline", grid: Union[int, tuple[int, int]]) -> None:
    """A pooling grid or a random keep that an h x w grid (``grid``) cannot take fails here."""
    if isinstance(reduction, Pool):
        pool_groups(grid, reduction.rows, reduction.cols, torch.device("cpu"))
    elif isinstance(reduction, RandomPrune):
        random_keep(grid, reduction.keep, 0, torch.device("cpu"))


def pool_grids(grid: Union[int, tuple[int, int]]) -> list[tuple[int, int]]:
    """Pooling grids (rows, cols) for an h x w patch grid (``grid``: its side, or (h, w)), most
    cells first: every grid that fits and whose cells are at most 1.5 times longer one way than
    the other (or whose rows and columns differ by one where h = w), so the cell count steps
    finely enough to match a budget; of equal counts the squarest cells."""
    h, w = grid_shape(grid)

    def stretch(r: int, c: int) -> float:  # cell height / width, >= 1
        return max(h * c, w * r) / min(h * c, w * r)
    grids = [(r, c) for r in range(1, h + 1) for c in range(1, w + 1)
             if (h == w and abs(r - c) <= 1) or stretch(r, c) <= 1.5]
    return sorted(grids, key=lambda g: (-g[0] * g[1], stretch(*g), -g[0]))


def tome_r(merges: int, layers_run: int, depth: int) -> tuple[int, ...]:
    """``merges`` ToMe merges per crop spread evenly over the first ``layers_run`` of ``depth``
    layers (the remainder one more each in the earliest layers); later layers merge nothing."""
    base, extra = divmod(max(merges, 0), max(layers_run, 1))
    return tuple(base + (i < extra) if i < layers_run else 0 for i in range(depth))
