"""DToMe inside a Qwen-VL vision tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), on whole 2 x 2 units,
with every block's attention run on the virtual (vanilla) layout.

The PatchMerger needs all four patches of every unit, so a compact token here is a whole unit:
four patch rows (4, C), merged slot by slot (size-weighted means). A block merges on the metric
of the post-merger rounds: its own pre-RoPE keys, averaged over heads, a unit's four patches side
by side.

Once a block has merged, the tower carries compact patch rows (4 * n, C) from block to block:

* norm, qkv, output projection and MLP run on compact rows only;
* attention runs on the *virtual layout*: qkv of each compact unit is gathered to every member
  position, each copy then gets its own 2-D RoPE and its own window or frame from HF's own
  ``cu_seqlens``, through the attention module's own forward (FlashAttention varlen, SDPA or
  eager per chunk, as configured), and the copies' outputs are averaged back before the output
  projection. s copies of a key at one place give exp(q.k + log s): proportional attention,
  with no mask or bias, and RoPE and windows exact. Merges may cross windows.
* a block that merges does so after its MLP (on its own keys), so every block is exactly the
  vanilla block on the virtual input, its attention's copies averaged back, then the mean over
  the units it merged;
* the mergers (and Qwen3-VL's DeepStack mergers) run on compact units and hand every unit its
  row, so the tower's output keeps vanilla's shape (one row per unit, merged units repeated)
  and ``model.dymu_tower_last`` (``TowerRecord``) says which units share a row.

Matching runs per *piece* (an image, or one time step of a video: the tower's attention never
crosses them), pieces padded into one batch, units in raster order, exactly as the post-merger
rounds match, which then continue with the tower's groups.

    install(visual, [None] * 28 + [0.9] * 4)   # block index -> threshold (None: no merge)
    remove(visual)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ... import classswap
from ..costs import linear_macs
from ...merge import bipartite_scores, merge_tokens, select_threshold, survivor_counts

Selection = Callable[[int, Tensor, Tensor], Tensor]  # (block, best (B, Na), size (B, N)) -> src (B, Na)


def relative_parts(rows: Tensor, units: Sequence[int]) -> list[Tensor]:
    """Compact rows (U,) of consecutive parts of ``units`` units, each counted from its part's
    first row (a part's rows are consecutive and all used)."""
    return [part - part.min() for part in rows.split(list(units))]


@dataclass
class TowerRecord:
    """What the last patched tower pass did. rows: (U,) the compact row of every unit, raster
    order, items one after another (None: nothing merged); counts[k]: tokens (compact units)
    of each piece after block k; pieces: units per piece (an image, a video's time step);
    maps[k]: the rows as ``rows`` after each block k that merged (for merge maps per block)."""

    rows: Optional[Tensor]
    counts: list[list[int]]
    pieces: list[int]
    maps: dict[int, Tensor] = field(default_factory=dict)

    def split(self, units: Sequence[int]) -> list[Tensor]:
        """For consecutive parts of ``units`` units each (pieces, or whole items): each unit's
        compact row counted from its part's first row (needs ``rows``)."""
        return relative_parts(self.rows, units)

    def item_maps(self, units: Sequence[int]) -> list[dict[int, Tensor]]:
        """Per item of ``units`` units: block -> each unit's row after that block (raster order,
        counted from the item's first row), for every block that merged."""
        per_block = {k: relative_parts(rows, units) for k, rows in self.maps.items()}
        return [{k: parts[i] for k, parts in per_block.items()} for i in range(len(units))]

    def item_counts(self, pieces: Sequence[int]) -> list[list[int]]:
        """Per item of ``pieces`` consecutive pieces: its tokens after each block."""
        starts = [sum(pieces[:i]) for i in range(len(pieces))]
        return [[sum(block[s:s + n]) for block in self.counts] for s, n in zip(starts, pieces)]


@dataclass
class TowerPlan:
    """``visual.dymu_units``: thresholds[k] of block k (None: the block never merges); select:
    the edges a merging block merges instead of those above its threshold (calibration), as
    ``merge_rounds`` takes it; run: the pass under way; last: the last pass's ``TowerRecord``."""

    thresholds: list[Optional[float]]
    select: Optional[Selection] = None
    run: Optional["TowerRun"] = None
    last: Optional[TowerRecord] = None

    @property
    def merges(self) -> bool:
        return any(t is not None for t in self.thresholds)

    def merges_at(self, block: int) -> bool:
        return self.thresholds[block] is not None

    def pick(self, block: int, best: Tensor, size: Tensor) -> Tensor:
        if self.select is not None:
            return self.select(block, best, size)
        return select_threshold(best, size, float(self.thresholds[block]), protected=0)

    def __getstate__(self) -> dict[str, Any]:  # a pickled model keeps its thresholds, not a pass
        return {**self.__dict__, "run": None, "select": None}


@dataclass
class TowerRun:
    """One tower pass. raster: (U,) the raster index of each unit in the tower's order (Qwen2.5-VL
    orders units by window); pieces: units per piece. Once a block merged: rows (U,) the compact
    row of each unit (tower order), sizes (n,) units per compact row, counts: compact rows per
    piece; patch_rows (4U,) the compact patch row of every patch and patch_sizes (4n, 1) the
    copies of every compact patch row (both kept with ``rows``, read in every block)."""

    raster: Tensor
    pieces: list[int]
    rows: Optional[Tensor] = None
    sizes: Optional[Tensor] = None
    patch_rows: Optional[Tensor] = None
    patch_sizes: Optional[Tensor] = None
    counts: list[int] = field(default_factory=list)
    merged: dict[int, list[int]] = field(default_factory=dict)  # block -> counts after its merge
    maps: dict[int, Tensor] = field(default_factory=dict)  # block -> rows after its merge (raster order)
    stash: Optional[Tensor] = None  # the compact normed input of the attention now running
    keys: Optional[Tensor] = None  # its qkv (4n, 3C)

    @property
    def compact(self) -> bool:
        return self.rows is not None

    def place(self, rows: Tensor, sizes: Tensor, counts: list[int]) -> None:
        """A new layout: each unit's compact row, units per row, rows per piece."""
        self.rows, self.sizes, self.counts = rows, sizes, counts
        self.patch_rows = (4 * rows[:, None] + torch.arange(4, device=rows.device)).flatten()
        self.patch_sizes = sizes.repeat_interleave(4)[:, None]

    def start(self, x: Tensor) -> Tensor:
        """The first merge: every unit its own compact row, pieces in order, raster inside each.
        x (4U, C) in the tower's order -> (4U, C) in compact order."""
        self.place(self.raster.clone(), torch.ones(len(self.raster), dtype=torch.long, device=x.device),
                   list(self.pieces))
        order = self.raster.argsort()
        return x.view(len(order), 4, -1)[order].flatten(0, 1)

    def gather(self, compact: Tensor) -> Tensor:
        """Compact patch rows (4n, ...) -> every patch's copy (4U, ...), the tower's order."""
        return compact[self.patch_rows]

    def average(self, virtual: Tensor) -> Tensor:
        """Every patch's row (4U, C) -> the mean of its copies per compact patch row (4n, C),
        summed in at least float32."""
        wide = virtual.to(torch.promote_types(virtual.dtype, torch.float32))
        total = wide.new_zeros(4 * len(self.sizes), virtual.shape[-1]).index_add_(0, self.patch_rows, wide)
        return (total / self.patch_sizes.to(wide.dtype)).to(virtual.dtype)

    def merge(self, x: Tensor, metric: Tensor, pick: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """One matching per piece on compact units x (4n, C) with metric (n, M); merges the edges
        ``pick(best, size)`` selects. Returns the new compact rows (4n', C)."""
        C = x.shape[-1]
        units = nn.utils.rnn.pad_sequence(list(x.view(-1, 4 * C).split(self.counts)), batch_first=True)
        keys = nn.utils.rnn.pad_sequence(list(metric.split(self.counts)), batch_first=True)
        size = nn.utils.rnn.pad_sequence(list(self.sizes.split(self.counts)), batch_first=True)
        B, N, _ = units.shape
        groups = torch.where(size > 0, torch.arange(N, device=x.device).expand(B, N), N)
        best, dst = bipartite_scores(keys, size)
        src = pick(best, size)
        if not bool(src.any()):
            return x
        kept = survivor_counts(src, size)
        units, size, groups = merge_tokens(units, size, groups, src, dst, best, protected=0,
                                           n_new=int(kept.max()))
        counts = kept.tolist()
        offsets = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)
        piece = torch.repeat_interleave(torch.arange(B, device=x.device), torch.tensor(self.counts, device=x.device))
        local = self.rows - torch.tensor([0, *self.counts[:-1]], device=x.device).cumsum(0)[piece[self.rows]]
        valid = size > 0
        self.place(offsets[piece[self.rows]] + groups[piece[self.rows], local], size[valid], counts)
        return units[valid].view(-1, C)

    def per_block(self, depth: int) -> list[list[int]]:
        """Each piece's tokens after every block (the units until a block merges)."""
        counts, out = list(self.pieces), []
        for block in range(depth):
            counts = self.merged.get(block, counts)
            out.append(counts)
        return out


def unit_keys(qkv: Tensor, heads: int) -> Tensor:
    """qkv (4n, 3C) of compact patch rows -> the units' metric (n, 4 * head_dim): pre-RoPE keys
    averaged over heads, a unit's four patches side by side."""
    return qkv.view(qkv.shape[0], 3, heads, -1)[:, 1].mean(1).reshape(qkv.shape[0] // 4, -1)


def window_raster(visual: nn.Module, grid_thw: Tensor) -> Tensor:
    """(U,) the raster index of every unit in the order the tower runs them: Qwen2.5-VL's window
    order (HF's own ``get_vision_window_index``), else raster order itself."""
    units = int((grid_thw.prod(-1) // visual.spatial_merge_size ** 2).sum())
    if getattr(visual, "window_size", None) is None or not hasattr(visual, "fullatt_block_indexes"):
        return torch.arange(units, device=grid_thw.device)
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                       window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
    return index.to(grid_thw.device)


def unit_tower_forward(self: nn.Module, hidden_states: Tensor, grid_thw: Tensor, **kwargs: Any) -> Any:
    """The tower's own forward with a ``TowerRun`` open: blocks merge, mergers hand each unit
    its row, and the returned ``last_hidden_state`` is per patch again (the tower's order)."""
    plan: TowerPlan = self.dymu_units
    base = classswap.base_class(self).forward
    if not plan.merges:
        plan.last = None
        return base(self, hidden_states, grid_thw, **kwargs)
    spatial = self.spatial_merge_size ** 2
    pieces = [h * w // spatial for t, h, w in grid_thw.tolist() for _ in range(t)]
    plan.run = run = TowerRun(window_raster(self, grid_thw), pieces)
    try:
        out = base(self, hidden_states, grid_thw, **kwargs)
    finally:
        plan.run = None
    rows = run.rows[run.raster.argsort()] if run.compact else None
    plan.last = TowerRecord(rows, run.per_block(len(self.blocks)), pieces, run.maps)
    if run.compact and getattr(out, "last_hidden_state", None) is not None:
        out.last_hidden_state = run.gather(out.last_hidden_state)
    return out


def unit_block_forward(self: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor,
                       position_embeddings: Optional[tuple[Tensor, Tensor]] = None, **kwargs: Any) -> Tensor:
    """A Qwen ViT block (norm1 -> attention -> residual, norm2 -> MLP -> residual) on compact
    units, its attention on the virtual layout; a block that merges does so after its MLP, on
    its own keys. So every block's output at each patch is the vanilla block's on the virtual
    input (its attention's copies averaged back), then averaged over the units merged here."""
    plan: TowerPlan = self.dymu_units
    run, block = plan.run, self.dymu_block
    if run is None or not (run.compact or plan.merges_at(block)):
        return classswap.base_class(self).forward(self, hidden_states, cu_seqlens=cu_seqlens,
                                                  position_embeddings=position_embeddings, **kwargs)
    x = hidden_states if run.compact else run.start(hidden_states)
    run.stash = self.norm1(x)
    try:  # the attention's own forward, on a stand-in of the virtual length (qkv reads the stash)
        virtual = x.new_empty(len(run.patch_rows), 0)
        x = x + self.attn(virtual, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    finally:
        run.stash = None
    x = x + self.mlp(self.norm2(x))
    if plan.merges_at(block):
        x = run.merge(x, unit_keys(run.keys, self.attn.num_heads), lambda best, size: plan.pick(block, best, size))
        run.merged[block] = list(run.counts)
        run.maps[block] = run.rows[run.raster.argsort()]
    run.keys = None
    return x


def unit_qkv_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The qkv projection of the compact rows, gathered to every patch (the virtual layout)."""
    run: Optional[TowerRun] = self.dymu_units.run
    if run is None or run.stash is None:
        return classswap.base_class(self).forward(self, x)
    run.keys = classswap.base_class(self).forward(self, run.stash)
    return run.gather(run.keys)


def unit_proj_forward(self: nn.Module, x: Tensor) -> Tensor:
    """The output projection after the copies of each compact row are averaged back (it is
    linear, so this equals averaging after it, at a fraction of the cost)."""
    run: Optional[TowerRun] = self.dymu_units.run
    if run is None or run.stash is None:
        return classswap.base_class(self).forward(self, x)
    return classswap.base_class(self).forward(self, run.average(x))


def unit_merger_forward(self: nn.Module, x: Tensor) -> Tensor:
    """A PatchMerger (or DeepStack merger) on compact units, each unit then given its row."""
    run: Optional[TowerRun] = self.dymu_units.run
    out = classswap.base_class(self).forward(self, x)
    return out if run is None or not run.compact else out[run.rows]


classswap.register("unit_tower", unit_tower_forward)
classswap.register("unit_block", unit_block_forward)
classswap.register("unit_qkv", unit_qkv_forward)
classswap.register("unit_proj", unit_proj_forward)
classswap.register("unit_merger", unit_merger_forward)


def _parts(visual: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every module of ``visual`` the in-tower merging swaps, with its kind."""
    parts = [(visual, "unit_tower")]
    for block in visual.blocks:
        parts += [(block, "unit_block"), (block.attn.qkv, "unit_qkv"), (block.attn.proj, "unit_proj")]
    parts.append((visual.merger, "unit_merger"))
    parts += [(m, "unit_merger") for m in getattr(visual, "deepstack_merger_list", [])]
    return parts


def install(visual: nn.Module, thresholds: Sequence[Optional[float]], select: Optional[Selection] = None) -> TowerPlan:
    """Merge units inside ``visual`` (a Qwen-VL ViT): block k merges every edge scoring above
    thresholds[k] (None: it does not merge); or, with ``select``, the edges that picks in the
    blocks with a threshold (calibration). Installing again replaces the plan. Returns it."""
    if len(thresholds) != len(visual.blocks):
        raise ValueError(f"the tower has {len(visual.blocks)} blocks but {len(thresholds)} tower thresholds were given")
    values = [None if t is None or t == float("inf") else float(t) for t in thresholds]
    if any(t is not None and t != t for t in values):
        raise ValueError("a tower threshold is NaN")
    plan = TowerPlan(values, select)
    for k, block in enumerate(visual.blocks):
        block.dymu_block = k
    for module, kind in _parts(visual):
        module.dymu_units = plan
        if not classswap.is_swapped(module, kind):
            classswap.swap_in(module, kind)
    return plan


def remove(visual: nn.Module) -> None:
    """The tower as HF built it again (nothing happens when it was not patched)."""
    for module, kind in _parts(visual):
        if classswap.is_swapped(module, kind):
            classswap.swap_out(module)
        module.__dict__.pop("dymu_units", None)
        module.__dict__.pop("dymu_block", None)


@contextmanager
def installed(visual: nn.Module, thresholds: Optional[Sequence[Optional[float]]],
              select: Optional[Selection] = None) -> Iterator[None]:
    """While open, ``visual`` merges as ``install`` sets it (thresholds None: as HF built it);
    afterwards the plan it had before, or none, is back."""
    previous = plan_of(visual)
    if thresholds is None:
        remove(visual)
    else:
        install(visual, thresholds, select)
    try:
        yield
    finally:
        if previous is None:
            remove(visual)
        else:
            install(visual, previous.thresholds)


def plan_of(visual: nn.Module) -> Optional[TowerPlan]:
    """The installed plan, or None."""
    return visual.__dict__.get("dymu_units")


def _segments(visual: nn.Module, block: int, t: int, h: int, w: int) -> list[int]:
    """Patches per attention segment of ``block`` on one item of t x h x w patches: one per time
    step, or (Qwen2.5-VL's window blocks) one per window of units, edges partial."""
    merge = visual.spatial_merge_size
    rows, cols = h // merge, w // merge
    full = getattr(visual, "fullatt_block_indexes", None)
    if full is None or block in full:
        return [h * w] * t
    side = visual.window_size // merge // visual.patch_size
    heights = [min(side, rows - r) for r in range(0, rows, side)]
    widths = [min(side, cols - c) for c in range(0, cols, side)]
    return [a * b * merge ** 2 for _ in range(t) for a in heights for b in widths]


def qwen_tower_flops(visual: nn.Module, grid_thw: Sequence[Sequence[int]],
                     tokens: Optional[Sequence[int]] = None) -> dict[str, float]:
    """FLOPs of one pass of a Qwen-VL ViT (``model.model.visual``) over items of ``grid_thw``
    (t, h, w patches each), by part: patch embedding; the blocks' linear layers (qkv, output
    projection, MLP) on the tokens entering each block; attention (scores and values) over the
    vanilla segments (frames, Qwen2.5-VL's windows), which in-tower merging keeps (it attends
    on the virtual layout); the mergers (PatchMerger, Qwen3-VL's DeepStack ones) on the tokens
    they get. tokens: tokens (units, or compact units) after every block, summed over the items
    (the accounting's ``tower_tokens``), None: no merging. Multiply-adds count 2."""
    grids = [tuple(int(v) for v in g) for g in grid_thw]
    units = sum(t * h * w for t, h, w in grids) // visual.spatial_merge_size ** 2
    patches = visual.spatial_merge_size ** 2
    depth = len(visual.blocks)
    after = list(tokens) if tokens is not None else [units] * depth
    if len(after) != depth:
        raise ValueError(f"{len(after)} token counts for a tower of {depth} blocks")
    entering = [units] + after[:-1]
    width = visual.blocks[0].attn.qkv.in_features
    embed = 2 * units * patches * visual.patch_embed.proj.weight.numel()
    linear = sum(2 * n * patches * linear_macs(block) for n, block in zip(entering, visual.blocks))
    attention = sum(4 * width * length ** 2 for k in range(depth) for g in grids for length in _segments(visual, k, *g))
    deep = getattr(visual, "deepstack_visual_indexes", None) or []
    mergers = 2 * after[-1] * linear_macs(visual.merger) + sum(
        2 * after[k] * linear_macs(m) for k, m in zip(deep, getattr(visual, "deepstack_merger_list", [])))
    return {"embed": float(embed), "linear": float(linear), "attention": float(attention), "mergers": float(mergers),
            "total": float(embed + linear + attention + mergers)}


def vision_flops(model: nn.Module, inputs: dict, accounting: dict[str, Any]) -> Optional[float]:
    """The Qwen-VL tower's FLOPs on ``inputs``' images and videos, from the accounting's tower
    tokens when the tower merged; None for other towers."""
    visual = getattr(model.model, "visual", None)
    if visual is None or not hasattr(visual, "blocks"):
        return None
    grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
             for g in inputs[key].tolist()]
    per_item = accounting.get("tower_tokens")
    tokens = [sum(column) for column in zip(*per_item)][1:] if per_item else None  # the units entering: not a block
    return qwen_tower_flops(visual, grids, tokens)["total"] if grids else 0.0
