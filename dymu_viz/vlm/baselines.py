"""Matched-budget baselines for DyMU on LLaVA-1.5 and LLaVA-OneVision.

DyMU's token count depends on the image; to compare it fairly, each baseline is sized so that
its *mean* count on the same images equals DyMU's:

* ``ToMe``: fixed r in the tower (the same count for every crop), as in ToMe;
* ``Pool``: uniform 2-D average pooling of each crop's patch grid to rows x cols cells.

Both are merges with a known partition of the patches, so they run through the same LLM path
as DyMU: ``patch_vlm(model, ToMe(...) | Pool(...), mode="vtu" | "compact")``. VTU then shows
each pooled / merged token at every patch position it covers; "compact" puts it at its first.

    target = mean_image_tokens(model, processor, images)           # under DyMU's patch_vlm
    pool = match_budget(model, processor, images, target, "pool")  # Pool(rows, cols)
    vlm.patch_vlm(model, pool)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

KINDS = ("tome", "pool")


@dataclass(frozen=True)
class ToMe:
    """ToMe with fixed r: r[i] merges in tower layer i (after ``vision_feature_layer`` ignored).
    measured: the mean image tokens ``match_budget`` measured with it."""

    r: tuple[int, ...]
    measured: Optional[float] = field(default=None, compare=False)


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


def mean_image_tokens(model: nn.Module, processor: Any, images: Sequence[Any], batch_size: int = 8) -> float:
    """Mean compact image tokens per image (what the LLM computes on: for OneVision with its
    newline tokens) of the patched ``model`` on ``images``, one image per prompt."""
    from .pipeline import _images_of

    counts = []
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        pixels = processor.image_processor(images=list(images[start:start + batch_size]), return_tensors="pt")
        sizes = pixels.get("image_sizes")
        with torch.no_grad():
            tokens = _images_of(model)(model, pixels["pixel_values"].to(device),
                                       image_sizes=None if sizes is None else sizes.to(device))
        counts += [len(t.features) for t in tokens]
    if not counts:
        raise ValueError("no images to count tokens on")
    return sum(counts) / len(counts)


def match_budget(model: nn.Module, processor: Any, images: Sequence[Any], target: float, kind: str,
                 mode: str = "vtu", batch_size: int = 8) -> Baseline:
    """The ``kind`` baseline ("tome" or "pool") whose mean image tokens on ``images`` is closest
    to ``target`` (e.g. a DyMU run's ``mean_image_tokens``): a binary search over ToMe's merges
    per crop, or over the pooling grids of ``pool_grids``, measuring with
    the real tower each time. The model is left patched with the result (``mode`` as in
    ``patch_vlm``); ``measured`` holds its mean."""
    from .pipeline import is_qwen, patch_vlm

    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
    if mode == "full":
        raise ValueError('mode="full" merges nothing, so no budget can be matched; use "vtu" or "compact"')
    if is_qwen(model):
        raise ValueError("matched-budget baselines are for LLaVA-1.5 / OneVision towers")
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    depth = cfg.vision_config.num_hidden_layers
    layers_run = cfg.vision_feature_layer % (depth + 1)
    if kind == "tome":
        candidates: list[Baseline] = [ToMe(tome_r(m, layers_run, depth)) for m in range(side * side)]
    else:  # like ToMe: the count falls along the list
        candidates = [Pool(rows, cols) for rows, cols in pool_grids(side)]

    def measure(i: int) -> float:
        patch_vlm(model, candidates[i], mode=mode)
        return mean_image_tokens(model, processor, images, batch_size)

    low, high = 0, len(candidates) - 1  # the count falls from low to high
    counts = {low: measure(low), high: measure(high)}
    while high - low > 1:
        middle = (low + high) // 2
        counts[middle] = measure(middle)
        low, high = (middle, high) if counts[middle] >= target else (low, middle)
    best = min((low, high), key=lambda i: abs(counts[i] - target))
    chosen = candidates[best]
    patch_vlm(model, chosen, mode=mode)
    return type(chosen)(**{**chosen.__dict__, "measured": counts[best]})
