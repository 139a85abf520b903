"""Qwen2-VL and Qwen2.5-VL: DToMe on the visual tokens after the PatchMerger, and the 3-row
M-RoPE positions VTU needs.

The vision tower runs as HF runs it (window attention, cu_seqlens, FlashAttention, 2-D RoPE
all untouched). Its output is one token per 2 x 2 patch *unit*, in raster order per image.
DToMe then merges units in threshold *rounds*: each round is one bipartite matching of the
existing ``merge.py`` (every edge above the round's threshold, at most half the tokens), on a
padded batch of images of any sizes. The similarity metric is the pre-RoPE keys of the last
full-attention ViT block, averaged over heads and concatenated over the unit's four patches;
merged tokens carry the size-weighted mean of both features and metric into the next round.

Options: the metric (``METRICS``), restricted matching inside windows of units for very large
images (``window_order``), and for videos, after each time step's rounds, merging across
neighbouring time steps (``merge_time_steps``, threshold from ``calibrate_temporal``).

The virtual sequence is the one vanilla HF builds: every unit at its own (t, h, w) position
from the model's ``get_rope_index``; text after an image continues at max + 1 (HF's rule).
"""

from __future__ import annotations

import itertools
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn

from ...calibrate import (Progress, dist_info, gather_objects, images_digest, load_checkpoints, mean_thresholds,
                          model_digest, remove_checkpoints, write_atomic)
from ...dataset import load_rgb
from ...merge import bipartite_scores, merge_tokens, score_dtype, select_batch_top, select_fixed_r, select_threshold
from ...thresholds import Thresholds
from . import qwen_tower as unit_tower
from ..family import VisualInput, VLMFamily, VLMSpec, register
from ..pipeline import prompt_inputs
from ..reductions import BASELINES, Baseline, ToMe, reduce_grid
from ..standin import (CHATML_ROLES, CHATML_SPECIALS, answer_in_words, build_tokenizer, scaled_llm_note,
                       scaled_text_config, tower_blocks)
from ..tokens import ImageTokens

QWEN_FAMILIES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
ROUNDS_KIND = "qwen_unit_rounds"  # Thresholds.metadata["kind"] of calibrated rounds
# Similarity metrics of the rounds: "keys" (pre-RoPE keys of the last full-attention ViT block,
# head-averaged, a unit's 4 patches concatenated; the default), "blocks" (the same keys, but round
# k reads those of its own full-attention block, spread over the tower's depth: ``metric_blocks``)
# or "features" (the merger's output units themselves: no hook, so it also fits precomputed
# features).
METRICS = ("keys", "blocks", "features")


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown unit metric {metric!r}; choose one of {', '.join(METRICS)}")


def check_window(window: Optional[int]) -> None:
    if window is not None and int(window) < 2:
        raise ValueError(f"window must be at least 2 units per side, got {window}")


def full_attention_blocks(visual: nn.Module) -> list[int]:
    """The ViT blocks that attend over the whole image: Qwen2.5-VL's ``fullatt_block_indexes``;
    every Qwen2-VL block."""
    return sorted(getattr(visual, "fullatt_block_indexes", None) or range(len(visual.blocks)))


def metric_blocks(visual: nn.Module, metric: str, rounds: int) -> list[int]:
    """The blocks whose keys each round matches on: the last full-attention block for every round
    ("keys"), or round k's share of the full-attention blocks, ending at the last ("blocks": 4
    rounds on Qwen2.5-VL-7B read blocks 7, 15, 23, 31; on Qwen2-VL's 32 full blocks the same)."""
    full = full_attention_blocks(visual)
    if metric == "keys":
        return [full[-1]]
    return [full[math.ceil(len(full) * (k + 1) / rounds) - 1] for k in range(rounds)]


@contextmanager
def _metric_in_pooler_output(visual: nn.Module, blocks: Sequence[int]) -> Iterator[None]:
    """While open, the tower's merger returns [unit feature | unit keys of each of ``blocks``]
    (U, D + len(blocks) * 4 * head_dim): the model itself then puts both in raster order
    (Qwen2.5-VL's window order is undone after the merger) and splits them per image."""
    keys: dict[int, Tensor] = {}
    heads = visual.config.num_heads

    def keep_keys(block: int) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, args: Any, qkv: Tensor) -> None:
            keys[block] = qkv.view(qkv.shape[0], 3, heads, -1)[:, 1].mean(1)  # (patches, head_dim), pre-RoPE
        return hook

    def append_metric(module: nn.Module, args: Any, units: Tensor) -> Tensor:
        # a unit's 4 patches are consecutive rows, as the merger groups them
        per_block = [keys[b].reshape(units.shape[0], -1).to(units.dtype) for b in blocks]
        keys.clear()
        return torch.cat([units, *per_block], -1)

    hooks = [visual.blocks[b].attn.qkv.register_forward_hook(keep_keys(b)) for b in sorted(set(blocks))]
    hooks.append(visual.merger.register_forward_hook(append_metric))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def tower_units(model: nn.Module, pixel_values: Tensor, grid_thw: Tensor, video: bool = False,
                metric: str = "keys", rounds: int = 1) -> list[tuple[Tensor, Tensor]]:
    """Per image (or video): (unit features (U, D) exactly as vanilla's ``get_image_features``
    (``get_video_features``) gives them, unit metric (U, M): see ``METRICS``; with "blocks" the
    ``rounds`` rounds' metrics side by side, (U, rounds * M)), units in raster order (a video's
    time steps one after the other)."""
    check_metric(metric)
    features = model.model.get_video_features if video else model.model.get_image_features
    D = model.config.get_text_config().hidden_size  # the merger projects to the LLM width
    if metric == "features":
        out = features(pixel_values, grid_thw)
        return [(with_deepstack(u, out, i), u) for i, u in enumerate(out.pooler_output)]
    with _metric_in_pooler_output(model.model.visual, metric_blocks(model.model.visual, metric, rounds)):
        out = features(pixel_values, grid_thw)
    return [(with_deepstack(u[:, :D], out, i), u[:, D:]) for i, u in enumerate(out.pooler_output)]


def with_deepstack(units: Tensor, out: Any, item: int) -> Tensor:
    """An item's unit features (U, D) with the tower's DeepStack features of the same units side
    by side, (U, D * (1 + k)), when the tower returns k of them (Qwen3-VL), so that the rounds
    merge them with the same groups (size-weighted means); else the features as they are."""
    deep = getattr(out, "deepstack_features", None) or []
    if deep and torch.is_tensor(deep[0]):  # transformers < 5.23: each level's units of every item in one tensor
        sizes = [len(u) for u in out.pooler_output]
        deep = [level.split(sizes) for level in deep]
    return torch.cat([units, *(level[item].to(units.dtype) for level in deep)], -1) if deep else units


def metric_views(metric: str, rounds: int) -> int:
    """How many per-round parts the metric of ``tower_units`` holds side by side."""
    return rounds if metric == "blocks" else 1


Selection = Callable[[int, Tensor, Tensor], Tensor]  # (round, best, size) -> src, as in merge.py


def merge_rounds(x: Tensor, metric: Tensor, size: Tensor, rounds: int,
                 select: Selection, views: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """DToMe rounds on a padded batch of unit rows: x (B, U, D), metric (B, U, M), size (B, U)
    1 for a unit, 0 for padding. The metric holds ``views`` equal parts side by side; round k
    matches bipartitely on part k % views and merges the edges ``select(k, best, size)`` picks
    (features and metric averaged by size). Stops early once every image is down to one token.
    Returns x (B, N, D), size (B, N) and groups (B, U): the row each unit ends in (N for padding
    units)."""
    B, U, D = x.shape
    M = metric.shape[-1] // views
    groups = torch.where(size > 0, torch.arange(U, device=x.device).expand(B, U), U)
    both = torch.cat([x, metric.to(x.dtype)], -1)
    for k in range(rounds):
        if both.shape[1] < 2:
            break
        part = D + k % views * M
        best, dst = bipartite_scores(both[..., part:part + M], size)
        src = select(k, best, size)
        if bool(src.any()):
            both, size, groups = merge_tokens(both, size, groups, src, dst, best, protected=0)
    return both[..., :D], size, groups


def unit_rounds(x: Tensor, metric: Tensor, size: Tensor, thresholds: Sequence[float],
                views: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Inference rounds: round k merges every edge scoring above thresholds[k] (at most half the
    tokens of each image). Shapes and views as in ``merge_rounds``."""
    return merge_rounds(x, metric, size, len(thresholds),
                        lambda k, best, size: select_threshold(best, size, float(thresholds[k]), protected=0), views)


def piece_reductions(pieces: list[tuple[Tensor, Tensor]], grids: Sequence[tuple[int, int]], pixels: Sequence[Tensor],
                     reduction: Baseline, views: int = 1) -> list[tuple[Tensor, Tensor]]:
    """A matched-budget baseline on the rows the rounds run on (``pieces``: (features (S, D),
    metric (S, M)) each, S = h * w units of ``grids``, raster): ToMe merges r[k] pairs of every
    piece in round k on the rounds' metric; pooling and random pruning act on the unit grid
    (``reductions.reduce_grid``, seeded by each piece's ``pixels``). Per piece: its tokens and
    the row of each of its units."""
    if isinstance(reduction, ToMe):
        x, size, groups = merge_rounds(*padded_units(pieces), len(reduction.r),
                                       lambda k, best, size: select_fixed_r(best, size, reduction.r[k], protected=0),
                                       views)
        kept = (size > 0).sum(-1).tolist()
        return [(x[b, :kept[b]], groups[b, :len(f)]) for b, (f, _) in enumerate(pieces)]
    return [reduce_grid(f, grid, reduction, p) for (f, _), grid, p in zip(pieces, grids, pixels)]


def rounds_steps(model: nn.Module) -> tuple[int, int]:
    """ToMe's merges spread over the rounds DyMU runs on ``model`` (4 when it runs none)."""
    rounds = len(getattr(model.__dict__.get("dymu_vlm"), "unit_thresholds", None) or [None] * 4)
    return rounds, rounds


def padded_units(units: list[tuple[Tensor, Tensor]], sizes: Optional[list[Tensor]] = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (features, metric) -> padded x (B, U, D), metric (B, U, M), size (B, U): 1 per
    unit, or ``sizes`` (units per row, when the tower merged), 0 for padding."""
    x = nn.utils.rnn.pad_sequence([f for f, _ in units], batch_first=True)
    metric = nn.utils.rnn.pad_sequence([m for _, m in units], batch_first=True)
    if sizes is not None:
        return x, metric, nn.utils.rnn.pad_sequence(sizes, batch_first=True)
    counts = torch.tensor([len(f) for f, _ in units], device=x.device)
    return x, metric, (torch.arange(x.shape[1], device=x.device) < counts[:, None]).long()


def collapse_units(features: Tensor, metric: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Units the tower merged (``unit_tower``) as its compact rows, rows (U,) in [0, n):
    features (U, D) and metric (U, M) -> (n, D), (n, M), the mean of each row's units (the
    size-weighted mean the rounds keep; bitwise the row itself where its units agree, as the
    merger's output does; DeepStack features of a row merged after their block differ), and the
    units per row (n,)."""
    n = int(rows.max()) + 1
    size = torch.bincount(rows, minlength=n)
    first = torch.full((n,), len(rows), device=rows.device).scatter_reduce(
        0, rows, torch.arange(len(rows), device=rows.device), "amin")

    def mean(values: Tensor) -> Tensor:
        wide = values.to(score_dtype(values.dtype))
        gained = torch.zeros_like(wide[:n]).index_add_(0, rows, wide - wide[first][rows])
        return (wide[first] + gained / size[:, None].to(wide.dtype)).to(values.dtype)

    return mean(features), mean(metric), size


def batch_top_share(fraction: float, values: list[Optional[float]], merges: list[int]) -> Selection:
    """Calibration's selection: step k merges the batch's best edges, ``fraction`` of all its
    current tokens, and records the batch threshold (``merge.select_batch_top``'s: the best edge
    left, clamped >= 0) in values[k] and its merges in merges[k]."""
    def select(k: int, best: Tensor, size: Tensor) -> Tensor:
        src, values[k] = select_batch_top(best, size, 0, protected=0, total=int(fraction * int((size > 0).sum())))
        merges[k] = int(src.sum())
        return src
    return select


def calibration_rounds(x: Tensor, metric: Tensor, size: Tensor, fraction: float, rounds: int,
                       views: int = 1) -> tuple[list[Optional[float]], list[int]]:
    """One calibration batch: each round merges the batch's best edges, ``fraction`` of all its
    current tokens (the batch rule of spec section 3.2 with a share instead of a count, since
    Qwen's unit counts follow the resolution). Returns per round the batch threshold (the best
    edge left, clamped >= 0; None when the round had no edge or did not run) and the merges."""
    values: list[Optional[float]] = [None] * rounds
    merges = [0] * rounds
    merge_rounds(x, metric, size, rounds, batch_top_share(fraction, values, merges), views)
    return values, merges


def check_share(name: str, keep: float, steps: int) -> None:
    """A share of tokens that ``steps`` merging steps (each at most halving) can reach."""
    if not 2.0 ** -steps <= keep <= 1.0:
        raise ValueError(f"{name} must be between 2^-{steps} = {2.0 ** -steps:g} (every step halves) and 1, got {keep}")


@torch.no_grad()
def calibrate_rounds(model: nn.Module, processor: Any, images: Sequence[Any], keep: float = 0.25, rounds: int = 4,
                     batch_size: int = 4, progress: bool = True, metric: str = "keys",
                     window: Optional[int] = None,
                     units_of: Optional[Callable[[list[Any]], list[tuple[Tensor, Tensor]]]] = None,
                     tower_keep: Optional[float] = None, tower_blocks: Optional[Sequence[int]] = None,
                     out: Optional[Union[str, Path]] = None, resume: bool = False,
                     checkpoint_every: int = 5) -> Thresholds:
    """Thresholds for ``rounds`` DToMe rounds on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL tower, found
    on ``images`` (PIL images or paths) so that, on them, a share ``keep`` of the units survives:
    every round merges 1 - keep^(1 / rounds) of the current tokens (at most half, so keep >=
    2^-rounds). Batch thresholds are averaged over batches as for the encoders. Under torchrun
    each process takes every world-th batch; the result does not depend on the process count.
    Unreadable images are skipped and named in ``metadata["failures"]``. metric: see ``METRICS``
    and window (see ``qwen_images``) are recorded in the metadata; ``patch_vlm`` then uses them.

    tower_keep: also merge whole units *inside* the ViT (``unit_tower``), in ``tower_blocks``
    (default: every block), so that a share tower_keep of the units leaves the tower: each of
    those blocks merges 1 - tower_keep^(1 / blocks) of the current tokens; the rounds then take
    the tower's tokens on to ``keep`` of the units. Recorded in ``metadata["tower"]`` (values,
    r = 1 for a block that merges, the mean merges per image), which ``patch_vlm`` follows.

    out: the thresholds are saved there, and every ``checkpoint_every`` batches each process
    checkpoints what it finished beside it; ``resume`` continues an interrupted run from those
    checkpoints (any process count) and ends with the thresholds of an uninterrupted one.
    units_of: a batch of pictures -> the rows the rounds run on, (features (U, D), metric (U, M))
    each (another family's units; default: the Qwen tower's, per image or window)."""
    from tqdm.auto import tqdm

    if not images:
        raise ValueError("calibration got no images")
    if batch_size < 1 or checkpoint_every < 1:
        raise ValueError(f"batch_size and checkpoint_every must be at least 1, got {batch_size} and {checkpoint_every}")
    if tower_keep is not None and (units_of is not None or window is not None):
        raise ValueError("merging inside the tower is for Qwen-VL's tower, on whole images (no window=)")
    previous = unit_tower.plan_of(model.model.visual) if units_of is None else None
    if previous is not None and window is not None:
        raise ValueError("the model's tower merges (patch_vlm(tower=...)): the rounds run on whole images, no window=")
    depth = len(model.model.visual.blocks) if tower_keep is not None else 0
    blocks = sorted({int(b) for b in (range(depth) if tower_blocks is None else tower_blocks)})
    if tower_keep is None:
        if tower_blocks is not None:
            raise ValueError("tower_blocks needs tower_keep, the share of units the tower keeps")
        check_share("keep", keep, rounds)
    else:
        if not blocks or blocks[0] < 0 or blocks[-1] >= depth:
            raise ValueError(f"tower_blocks must name blocks of the {depth}-block tower, got {tower_blocks}")
        check_share("tower_keep", tower_keep, len(blocks))
        if not 0 < keep <= tower_keep or (rounds == 0 and keep != tower_keep):
            raise ValueError(f"keep ({keep}) is the share after the tower ({tower_keep}) and the rounds: it must be "
                             "at most tower_keep (equal when no rounds run)")
        check_share("keep / tower_keep", keep / tower_keep, rounds)
    rank, world = dist_info()
    fraction = 1.0 - (keep / (tower_keep or 1.0)) ** (1.0 / rounds) if rounds else 0.0
    tower_fraction = 1.0 - tower_keep ** (1.0 / len(blocks)) if tower_keep is not None else 0.0
    device = next(model.parameters()).device
    out = Path(out) if out is not None else None
    fingerprint = {"model": type(model).__name__, "keep": keep, "rounds": rounds, "metric": metric, "window": window,
                   "tower_keep": tower_keep, "tower_blocks": blocks if tower_keep is not None else None,
                   "batch_size": batch_size, "n_images": len(images), "images": images_digest(images),
                   "weights": model_digest(model), "dtype": str(next(model.parameters()).dtype)}
    done = load_checkpoints(out, fingerprint) if out is not None and resume else Progress()
    if out is not None and not resume and rank == 0:
        remove_checkpoints(out)
    tower_values: list[Optional[float]] = [None] * depth
    tower_merges = [0] * depth

    def qwen_pieces(batch: list[Any]) -> tuple[list[tuple[Tensor, Tensor]], Optional[list[Tensor]]]:
        pixels = processor.image_processor(images=batch, return_tensors="pt")
        grid = pixels["image_grid_thw"].to(device)
        units = tower_units(model, pixels["pixel_values"].to(device), grid, metric=metric, rounds=max(rounds, 1))
        pieces = split_pieces(units, [1] * len(units), unit_grids(model, grid), window)[0]
        tower = tower_piece_rows(model, [len(f) for f, _ in pieces])  # the tower merged (calibrated or patched)
        if tower is None:
            return pieces, None
        collapsed = [collapse_units(f, m, r) for (f, m), r in zip(pieces, tower)]
        return [(f, m) for f, m, _ in collapsed], [n for _, _, n in collapsed]

    starts = list(range(0, len(images), batch_size))
    mine = [j for j in range(len(starts)) if j % world == rank and j not in done.per_batch]
    local = Progress()
    local.merge(done)
    checkpoint = out.with_name(out.name + f".partial.rank{rank}.json") if out is not None else None
    merging = [0.0 if k in blocks else None for k in range(depth)]  # which blocks merge; select picks the edges
    select = batch_top_share(tower_fraction, tower_values, tower_merges)
    with unit_tower.installed(model.model.visual, merging, select) if tower_keep is not None else nullcontext():
        for n, j in enumerate(tqdm(mine, desc="calibrating rounds", disable=not progress or rank != 0)):
            batch = []
            for i in range(starts[j], min(starts[j] + batch_size, len(images))):
                try:
                    batch.append(images[i] if hasattr(images[i], "convert") else load_rgb(images[i]))
                except Exception as err:  # a broken file must not stop a long run: report it
                    local.failures.append((i, f"{type(err).__name__}: {err}"))
            values, merges = [None] * (rounds + depth), [0] * (rounds + depth)
            if batch:
                tower_values[:], tower_merges[:] = [None] * depth, [0] * depth
                pieces, sizes = (units_of(batch), None) if units_of is not None else qwen_pieces(batch)
                values, merges = calibration_rounds(*padded_units(pieces, sizes), fraction, rounds,
                                                    metric_views(metric, rounds))
                values, merges = values + tower_values, merges + tower_merges
            local.per_batch[j], local.n_images[j], local.merges[j] = values, len(batch), merges
            if checkpoint is not None and ((n + 1) % checkpoint_every == 0 or n + 1 == len(mine)):
                write_atomic(checkpoint, json.dumps(local.to_json(fingerprint)))
    total = Progress()
    for part in gather_objects(local.to_json(fingerprint)):
        total.merge(Progress.from_json(part))
    used = sum(total.n_images.values())
    if used == 0:
        raise ValueError("calibration could read none of the images")
    values, counts = mean_thresholds(total.per_batch, rounds + depth)
    merged = [sum(m[k] for m in total.merges.values()) for k in range(rounds + depth)]
    r = [round(m / used) for m in merged]  # mean merges per image and step, on these images
    metadata = {"kind": ROUNDS_KIND, "metric": metric, "window": window, "keep": keep, "merge_fraction": fraction,
                "n_images": used, "n_batches": len(total.per_batch), "batches_per_round": counts[:rounds],
                "failures": [[i, e] for i, e in sorted(total.failures)], "processes": world}
    if tower_keep is None and previous is not None:  # the rounds were found on the patched tower's output
        metadata["tower"] = {"values": previous.thresholds, "r": [int(v is not None) for v in previous.thresholds]}
    if tower_keep is not None:
        metadata["tower"] = {"values": [v if k in blocks else None for k, v in enumerate(values[rounds:])],
                             "r": [int(k in blocks) for k in range(depth)], "merges": r[rounds:], "keep": tower_keep,
                             "merge_fraction": tower_fraction, "batches_per_block": counts[rounds:]}
    thresholds = Thresholds(values[:rounds], r[:rounds], model=type(model).__name__, schedule="constant",
                            metadata=metadata)
    if out is not None and rank == 0:
        thresholds.save(out)
        remove_checkpoints(out)
    return thresholds


@torch.no_grad()
def calibrate_temporal(model: nn.Module, processor: Any, videos: Sequence[Any], thresholds: Thresholds,
                       keep: float = 0.5, progress: bool = True, steps: int = 40) -> Thresholds:
    """The threshold for merging across video time steps (``merge_time_steps``), found on
    ``videos`` (each an array (frames, H, W, 3) or a list of frames, as the video processor takes
    them) so that, after the rounds of ``thresholds`` inside each step, a share ``keep`` of their
    tokens survives: the largest threshold whose merging leaves at most that share, by bisection
    over [-1, 1] (``steps`` halvings). Returns a copy of ``thresholds`` with it in
    ``metadata["temporal"]``, which ``patch_vlm`` then applies. Under torchrun each process
    encodes every world-th video; the counts are summed, so the result does not depend on the
    process count."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    if thresholds.metadata.get("kind") != ROUNDS_KIND:
        raise ValueError("calibrate_temporal needs the rounds' thresholds from calibrate_rounds")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if not videos:
        raise ValueError("calibration got no videos")
    rank, world = dist_info()
    device = next(model.parameters()).device
    metric = thresholds.metadata.get("metric", "keys")
    mine = []
    tower = tower_thresholds(model, thresholds.metadata.get("tower"))  # the tower the rounds were found after
    with unit_tower.installed(model.model.visual, tower):
        for i in tqdm(range(rank, len(videos), world), desc="encoding videos", disable=not progress or rank != 0):
            clip = processor.video_processor(videos=[videos[i]], return_tensors="pt")
            mine += step_rows(model, clip["pixel_values_videos"].to(device), clip["video_grid_thw"].to(device),
                              thresholds.values, True, metric, time_metric=True,
                              window=thresholds.metadata.get("window"))

    def tokens_left(tau: float) -> int:  # summed over every process's videos
        return sum(gather_objects(sum(len(merge_time_steps(rows, m, width, tau)[0]) for m, rows, width in mine)))

    before = tokens_left(float("inf"))
    target = keep * before
    low, high = -1.0, 1.0  # tokens_left(high) = before (no score beats 1); tokens_left(low): every allowed edge
    if tokens_left(low) > target:
        raise ValueError(f"merging across time leaves at least {tokens_left(low) / before:.3f} of the tokens on these "
                         f"videos (edges reach only neighbouring grid cells); keep={keep} cannot be reached")
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if tokens_left(middle) <= target else (low, middle)
    tau = 1.0 if tokens_left(1.0) <= target else low  # keep = 1: nothing merges (no score beats 1)
    return replace(thresholds, metadata={**thresholds.metadata, "temporal": tau, "temporal_keep": keep,
                                         "temporal_videos": len(videos)})


def qwen_images(model: nn.Module, pixel_values: Tensor, image_grid_thw: Optional[Tensor] = None,
                thresholds: Optional[Sequence[float]] = None, video: bool = False, metric: str = "keys",
                temporal: Optional[float] = None, window: Optional[int] = None, reduction: Optional[Baseline] = None,
                **kwargs: Any) -> list[ImageTokens]:
    """Per image: its compact unit features and the mapping from each of its U units (raster
    order, the placeholders' order) to its compact row. thresholds: one per round (None or
    empty: no merging, vanilla features). video: pixel_values and image_grid_thw are
    ``pixel_values_videos`` and ``video_grid_thw``; the rounds merge within each time step, then
    ``temporal`` (a threshold; None: no merging across time) merges tokens of neighbouring steps
    (see ``merge_time_steps``). metric: see ``METRICS``. window: match only inside blocks of
    window x window units (``window_order``; None: the whole image). reduction: a matched-budget
    baseline instead of the rounds (``piece_reductions``)."""
    across_time = video and temporal is not None
    D = model.config.get_text_config().hidden_size
    out = []
    items = step_rows(model, pixel_values, image_grid_thw, thresholds, video, metric, across_time, window, reduction)
    plan = unit_tower.plan_of(model.model.visual)
    tower = plan.last.item_counts([len(steps) for _, steps, _ in items]) if plan and plan.last else [None] * len(items)
    for (unit_metric, steps, width), counts in zip(items, tower):
        feats, mapping = (merge_time_steps(steps, unit_metric, width, float(temporal)) if across_time
                          else concat_steps(steps))
        extras = feats[:, D:].unflatten(1, (-1, D)) if feats.shape[1] > D else None  # DeepStack, merged alike
        # the tower's output: its units, or its compact units when it merged
        out.append(ImageTokens(feats[:, :D], mapping, [counts[-1] if counts else len(unit_metric)], extras,
                               [len(mapping), *counts] if counts else None).in_slot_order())
    return out


def step_rows(model: nn.Module, pixel_values: Tensor, grid_thw: Optional[Tensor], thresholds: Optional[Sequence[float]],
              video: bool, metric: str, time_metric: bool = False, window: Optional[int] = None,
              reduction: Optional[Baseline] = None) -> list[tuple[Tensor, list[tuple[Tensor, Tensor]], int]]:
    """Per image or video, after the rounds inside each time step (inside each ``window`` x
    ``window`` block of units when given: see ``window_order``), or after the matched-budget
    ``reduction`` of each time step (``piece_reductions``): (its units' metric for matching
    across time (U, M) -- the last block's part with "blocks"; the unit features when
    ``time_metric`` is False and nothing merges --, per time step (tokens (n_t, D), its units'
    rows (S,)), units per grid row)."""
    if grid_thw is None:
        raise ValueError(f"Qwen2-VL models need {'video' if video else 'image'}_grid_thw with their pixel values "
                         "(the processor returns both)")
    tome = reduction.r if isinstance(reduction, ToMe) else None
    metric = metric if thresholds or time_metric or tome else "features"
    rounds = len(tome or thresholds or [None])
    views = metric_views(metric, rounds)
    units = tower_units(model, pixel_values, grid_thw, video, metric, rounds)
    steps = [int(t) for t in grid_thw[:, 0]] if video else [1] * len(units)
    grids = unit_grids(model, grid_thw)
    pieces, orders = split_pieces(units, steps, grids, window)
    tower = tower_piece_rows(model, [h * w for (h, w), t in zip(grids, steps) for _ in range(t)])
    if tower is not None:
        if window is not None or reduction is not None:
            raise ValueError("with merging inside the tower, the rounds run on each image's whole unit grid: "
                             "window= and the matched-budget baselines do not apply")
        collapsed = [collapse_units(f, m, r) for (f, m), r in zip(pieces, tower)]
        pieces, sizes = [(f, m) for f, m, _ in collapsed], [n for _, _, n in collapsed]
    if reduction is not None:
        step_patches = [h * w for (_, h, w), t in zip(grid_thw.tolist(), steps) for _ in range(t)]
        step_grids = [grid for grid, t in zip(grids, steps) for _ in range(t)]
        rows = piece_reductions(pieces, step_grids, pixel_values.split(step_patches), reduction, views)
    elif thresholds:
        x, size, groups = unit_rounds(*padded_units(pieces, sizes if tower else None), thresholds, views)
        kept = (size > 0).sum(-1).tolist()
        rows = [(x[b, :kept[b]], groups[b, :len(f)]) for b, (f, _) in enumerate(pieces)]
    else:
        rows = [(f, torch.arange(len(f), device=f.device)) for f, _ in pieces]
    if tower is not None:  # each unit: its row in the tower, then that row's row after the rounds
        rows = [(x, g[r]) for (x, g), r in zip(rows, tower)]
    segments = []  # per image / time step: its windows' tokens, its units' rows in raster order
    for order, n in orders:
        if order is None:
            segments.append(rows[0])
        else:
            tokens, mapping = concat_steps(rows[:n])
            segments.append((tokens, mapping[order.argsort()]))
        rows = rows[n:]
    out, first = [], 0
    for (_, m), t, (_, w) in zip(units, steps, grids):
        out.append((m[:, -(m.shape[1] // views):], segments[first:first + t], w))
        first += t
    return out


def tower_piece_rows(model: nn.Module, pieces: Sequence[int]) -> Optional[list[Tensor]]:
    """When the tower merged units in its last pass (``unit_tower``): per piece (an image, a
    video's time step) of ``pieces`` units, each unit's row among the piece's compact rows;
    else None."""
    plan = unit_tower.plan_of(model.model.visual)
    if plan is None or plan.last is None or plan.last.rows is None:
        return None
    return plan.last.split(pieces)


def unit_grids(model: nn.Module, grid_thw: Tensor) -> list[tuple[int, int]]:
    """(rows, columns) of each image's unit grid (patches / the merger's 2 x 2)."""
    spatial = model.model.visual.spatial_merge_size
    return [(h // spatial, w // spatial) for _, h, w in grid_thw.tolist()]


def split_pieces(units: list[tuple[Tensor, Tensor]], steps: Sequence[int], grids: Sequence[tuple[int, int]],
                 window: Optional[int]) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Optional[Tensor], int]]]:
    """The rows the rounds run on: each image's (features, metric) per time step, or per window
    of it. Returns the pieces and, per image / time step, (its window order or None, its number
    of pieces)."""
    check_window(window)
    pieces, orders = [], []
    for (f, m), t, (h, w) in zip(units, steps, grids):
        for step in zip(f.tensor_split(t), m.tensor_split(t)):
            order, sizes = window_order(h, w, window, f.device) if window else (None, [h * w])
            pieces += zip(*(part[order].split(sizes) if window else [part] for part in step))
            orders.append((order, len(sizes)))
    return pieces, orders


def window_order(height: int, width: int, window: int, device: torch.device) -> tuple[Tensor, list[int]]:
    """Restricted matching for large images: the units of a height x width grid (raster order)
    regrouped into ``window`` x ``window`` blocks, block by block in raster order, raster order
    inside each. Returns the order (S,) and the units per block; the rounds then match inside
    each block, (window^2 / 2)^2 scores each instead of (S / 2)^2 for the image."""
    unit = torch.arange(height * width, device=device)
    block = unit // width // window * -(-width // window) + unit % width // window  # (S,) block of each unit
    order = (block * height * width + unit).argsort()
    return order, torch.bincount(block).tolist()


def concat_steps(steps: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Time steps (or windows) one after the other: per step (tokens (n_t, D), units' rows (S_t,))
    -> tokens (sum n_t, D) and every unit's row in them (sum S_t,)."""
    offsets = itertools.accumulate((len(f) for f, _ in steps[:-1]), initial=0)
    return torch.cat([f for f, _ in steps]), torch.cat([g + o for (_, g), o in zip(steps, offsets)])


def merge_time_steps(steps: Sequence[tuple[Tensor, Tensor]], metric: Tensor, width: int,
                     threshold: float, radius: float = 1.0) -> tuple[Tensor, Tensor]:
    """DToMe across the time steps of one video, after each step's own rounds.

    steps: per time step (its tokens (n_t, D), its units' rows (S,)); metric: the units' metric
    (T * S, M); width: units per grid row. A token's metric is its units' mean and its place
    their mean (row, column). Steps are paired as a binary tree, (0, 1), (2, 3), ... then the
    pairs, so a static background chains across every step in log2(T) levels. In each pair every
    token of the later block (A) looks for its most similar token of the earlier block (B) among
    those whose places are at most ``radius`` units apart in row and in column, and merges into
    it when the score beats ``threshold`` (features, metrics and places averaged by size).
    Returns the video's tokens (N, D) and each unit's row (T * S,), steps one after the other.
    """
    x, unit_rows = concat_steps(steps)  # (n, D), (T * S,)
    wdtype = score_dtype(x.dtype)
    slots = torch.arange(len(steps[0][1]), device=x.device)
    place = torch.stack([slots // width, slots % width], -1)  # (S, 2) grid row and column of each unit
    n = len(x)
    size = torch.zeros(n, device=x.device, dtype=wdtype).index_add_(0, unit_rows, torch.ones_like(unit_rows, dtype=wdtype))
    units = torch.cat([metric.to(wdtype), place.repeat(len(steps), 1).to(wdtype)], -1)
    both = torch.zeros(n, units.shape[1], device=x.device, dtype=wdtype).index_add_(0, unit_rows, units)
    both = torch.cat([x.to(wdtype), both / size[:, None]], -1)  # [feature | mean metric | mean place]
    D = x.shape[1]
    block = torch.repeat_interleave(torch.arange(len(steps), device=x.device),
                                    torch.tensor([len(f) for f, _ in steps], device=x.device))
    owner = torch.arange(n, device=x.device)  # the row each row has merged into (itself if alive)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    while int(block.max()) > 0:
        for left in range(0, int(block.max()), 2):
            a = torch.nonzero(alive & (block == left + 1)).squeeze(1)
            b = torch.nonzero(alive & (block == left)).squeeze(1)
            if len(a) == 0:
                continue
            metric_a = nn.functional.normalize(both[a, D:-2], dim=-1)
            scores = (metric_a @ nn.functional.normalize(both[b, D:-2], dim=-1).T).clamp(-1, 1)  # (n_a, n_b)
            far = (both[a, None, -2:] - both[None, b, -2:]).abs().amax(-1) > radius + 1e-4  # places are float means
            best, dst = scores.masked_fill(far, -torch.inf).max(-1)
            src = best > threshold
            if bool(src.any()):
                a, dst = a[src], b[dst[src]]
                weighted = torch.zeros_like(both).index_add_(0, dst, (both[a] - both[dst]) * size[a, None])
                size.index_add_(0, dst, size[a])
                both = both + weighted / size[:, None]  # rows that gain nothing stay bitwise unchanged
                alive[a], owner[a] = False, dst
        block = torch.div(block, 2, rounding_mode="floor")
    while not torch.equal(owner[owner], owner):  # follow merges into rows that merged again
        owner = owner[owner]
    new_row = alive.long().cumsum(0) - 1
    return both[alive, :D].to(x.dtype), new_row[owner[unit_rows]]


def token_types(model: nn.Module, input_ids: Tensor) -> Tensor:
    """HF's mm_token_type_ids from the ids: 1 image placeholder, 2 video placeholder, 0 text."""
    cfg = model.config
    return (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()


def rope_positions(model: nn.Module, input_ids: Tensor, mask: Tensor, start: Tensor, **grids: Any) -> Tensor:
    """(3, B, L) M-RoPE positions of a forward's tokens, exactly as vanilla HF numbers them
    (``get_rope_index`` with ``grids``: image_grid_thw, video_grid_thw, second_per_grid_ts),
    each row continuing at ``start`` (B,); 0 at padding."""
    types = token_types(model, input_ids)
    if bool(types.any()):
        pos, _ = model.model.get_rope_index(input_ids, types, attention_mask=mask, **grids)
    else:  # text only: consecutive positions over the valid tokens
        pos = ((mask.cumsum(-1) - 1).clamp_min(0) * mask)[None].expand(3, -1, -1)
    return (pos + start[None, :, None].to(pos.device)) * mask[None].to(pos.device)


# The stand-in's chat template, written after the real one: every image (video) as
# <|vision_start|><|image_pad|> (<|video_pad|>) <|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def standin_processor(version: str, patch: int = 14, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> Any:
    """Qwen2-VL / Qwen2.5-VL (version "2" or "2.5"): the real processor class with HF's own
    Qwen2-VL image processor (2 x 2 patch units, dynamic resolution between min_pixels and
    max_pixels) and the stand-in tokenizer with Qwen's vision tokens (random-init models only)."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    images = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    videos = Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    cls = {"2": Qwen2VLProcessor, "2.5": Qwen2_5_VLProcessor}[version]
    tokenizer = build_tokenizer(CHATML_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                  "im_start": "<|im_start|>", "vision_start": "<|vision_start|>",
                                                  "vision_end": "<|vision_end|>"}, CHATML_ROLES)
    return cls(image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=CHAT_TEMPLATE)


@dataclass(frozen=True)
class RoundSettings:
    """rounds: one threshold per DToMe round after the PatchMerger (None: no merging); metric:
    their similarity (``METRICS``); temporal: the threshold for merging across a video's time
    steps (None: none); window: the rounds match inside blocks of window x window units (None:
    the whole image); reduction: a matched-budget baseline on every image's (time step's) units
    instead of the rounds (``piece_reductions``); tower: a threshold per ViT block for merging
    whole units inside the tower (``unit_tower``; None: the tower runs as HF's)."""

    rounds: Optional[list[float]] = None
    metric: str = "keys"
    temporal: Optional[float] = None
    window: Optional[int] = None
    reduction: Optional[Baseline] = None  # a matched-budget baseline instead of the rounds
    tower: Optional[list[Optional[float]]] = None


def tower_thresholds(model: nn.Module, tower: Any) -> Optional[list[Optional[float]]]:
    """In-tower thresholds, one per ViT block: a sequence (None or inf: the block does not
    merge), or the ``{"values": [...], "r": [...]}`` a calibration records (r[k] = 0: block k
    never merges); None: no merging in the tower."""
    if tower is None:
        return None
    if isinstance(tower, (int, float)):
        raise ValueError("tower= takes one threshold per ViT block (None for a block that does not merge)")
    if isinstance(tower, dict):
        tower = [v if r else None for v, r in zip(tower["values"], tower["r"])]
    depth = len(model.model.visual.blocks)
    if len(tower) != depth:
        raise ValueError(f"{len(tower)} tower thresholds for a tower of {depth} blocks; give one per block "
                         "(None where a block does not merge)")
    values = [None if v is None or float(v) == float("inf") else float(v) for v in tower]
    if any(v is not None and v != v for v in values):
        raise ValueError("a tower threshold is NaN")
    return values if any(v is not None for v in values) else None


def unit_metric_of(thresholds: Any, metric: Optional[str]) -> str:
    """The rounds' metric: ``metric`` if given, else the one calibrated thresholds record, else
    "keys"; a metric other than the calibrated one is refused (its thresholds would not fit)."""
    calibrated = thresholds.metadata.get("metric") if isinstance(thresholds, Thresholds) else None
    if metric is not None:
        check_metric(metric)
    if metric is not None and calibrated is not None and metric != calibrated:
        raise ValueError(f"these thresholds were calibrated with metric={calibrated!r}, not {metric!r}")
    return metric or calibrated or "keys"


def unit_round_thresholds(thresholds: Any) -> Optional[list[float]]:
    """The DToMe rounds: a ``Thresholds`` (one value per round), a sequence of floats, or None
    (no merging). A single float is refused: the number of rounds must be explicit."""
    if thresholds is None:
        return None
    if isinstance(thresholds, Thresholds) and thresholds.metadata.get("kind") != ROUNDS_KIND:
        raise ValueError(f"these thresholds ({thresholds.model or 'an encoder'}, {thresholds.layers} layers) were "
                         "calibrated for the layers of a ViT, not for DToMe rounds after Qwen's PatchMerger; calibrate "
                         "rounds with dymu_viz.vlm.qwen.calibrate_rounds (or pass a plain list, one value per round)")
    if isinstance(thresholds, (int, float)):
        raise ValueError("Qwen2-VL models take one threshold per DToMe round after the PatchMerger, e.g. "
                         "[0.9] * 6 for six rounds; a single number does not say how many rounds")
    values = [float(v) for v in (thresholds.values if isinstance(thresholds, Thresholds) else thresholds)]
    if any(v != v for v in values):
        raise ValueError("a round threshold is NaN")
    return values


IMAGE_UNITS = VisualInput("image", "image_token_id", "pixel_values", "image_grid_thw")
VIDEO_UNITS = VisualInput("video", "video_token_id", "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",))


QWEN25_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
QWEN2_VIT = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, hidden_act="quick_gelu")
QWEN25_TOWER = "Qwen2.5-VL ViT (32 x 1280, window attention)"


def lmms_resized(image: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """The picture lmms-eval's own Qwen models hand the processor (through qwen_vl_utils): RGB
    (transparency on white), each side rounded to a multiple of ``factor`` (the tower's patch
    times its merge size), then scaled down or up, keeping the aspect ratio, to fit
    [min_pixels, max_pixels], and resized with PIL's bicubic filter."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    image = image.convert("RGB")
    width, height = image.size
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = (max(factor, math.floor(side / beta / factor) * factor) for side in (height, width))
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = (math.ceil(side * beta / factor) * factor for side in (height, width))
    return image.resize((w, h))


class Qwen2VL(VLMFamily):
    """Qwen2-VL and Qwen2.5-VL: the tower as HF runs it, DToMe rounds on its output units, M-RoPE."""

    name = "qwen2_vl"
    title = "Qwen2-VL / Qwen2.5-VL"
    classes = QWEN_FAMILIES
    inputs = (IMAGE_UNITS, VIDEO_UNITS)
    placeholders = {"image": "<|image_pad|>", "video": "<|video_pad|>"}
    rounds = True
    baselines = True  # on each image's units, where the rounds merge (``piece_reductions``)
    lmms_name = "dymu_qwen2_5_vl"
    lmms_class = "DyMUQwen2VL"
    default_pretrained = "Qwen/Qwen2.5-VL-7B-Instruct"
    lmms_processor_resizes = True  # lmms-eval's own model lets the processor resize within its pixel bounds
    lmms_max_new_tokens = 128  # lmms-eval's own Qwen models' default

    def lmms_pictures(self, model: nn.Module, images: list[Any]) -> list[Any]:
        """As lmms-eval's own (chat) Qwen models: resized as qwen_vl_utils does, to multiples of
        the tower's unit within its default bounds (4 to 16384 units)."""
        vision = model.config.vision_config
        factor = vision.patch_size * vision.spatial_merge_size
        return [lmms_resized(image, factor, 4 * factor ** 2, 16384 * factor ** 2) for image in images]

    def lmms_processor_options(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        if not self.lmms_processor_resizes:
            return {"do_resize": False}
        return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
    checkpoints = {
        "Qwen/Qwen2.5-VL-7B-Instruct": VLMSpec("qwen2.5", QWEN25_TOWER, QWEN25_VIT, "Qwen2.5-7B", (28, 3584, 152064), {}),
        "Qwen/Qwen2.5-VL-3B-Instruct": VLMSpec("qwen2.5", QWEN25_TOWER, QWEN25_VIT, "Qwen2.5-3B", (36, 2048, 151936), {}),
        "Qwen/Qwen2-VL-7B-Instruct": VLMSpec("qwen2", "Qwen2-VL ViT (32 x 1280)", QWEN2_VIT, "Qwen2-7B",
                                             (28, 3584, 152064), {})}
    model_types = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration"}

    def build_random(self, spec: VLMSpec, vision_layers: Optional[int], text_layers: int,
                     text_width: int) -> tuple[nn.Module, Any, str]:
        """The real ViT (its first ``vision_layers`` blocks, the full-attention ones among them
        kept), an LLM scaled down with M-RoPE sections scaled to its head dim (the real [16, 24,
        24] of 128)."""
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                                  Qwen2VLForConditionalGeneration)

        processor = standin_processor(spec.family.removeprefix("qwen"))  # HF's range: 4 to 1280 units of 28 px
        tok = processor.tokenizer
        depth = spec.vision["depth"]
        blocks = tower_blocks(vision_layers, depth, spec.tower)
        vision = dict(spec.vision, depth=blocks)
        heads = max(1, text_width // 64)
        half = (text_width // heads) // 2  # M-RoPE sections (t, h, w) split the head dim's half as 2 : 3 : 3
        sections = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
        text = scaled_text_config(tok, text_layers, text_width, num_key_value_heads=max(1, heads // 2),
                                  max_position_embeddings=32768,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections})
        ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
        if spec.family == "qwen2.5":
            full = [i for i in spec.vision["fullatt_block_indexes"] if i < blocks] or [blocks - 1]
            vision.update(out_hidden_size=text_width, fullatt_block_indexes=full)
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
        else:
            vision.update(hidden_size=text_width)
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
        answer_in_words(model, tok)
        width = spec.vision.get("hidden_size", spec.vision.get("embed_dim"))
        note = (f"{type(model).__name__} with the {spec.tower} at its real width ({blocks} of its {depth} blocks x "
                f"{width}, patch {spec.vision['patch_size']}, 2 x 2 units) and "
                f"{scaled_llm_note(spec.llm, spec.llm_shape, text_layers, text_width, len(tok))}")
        return model, processor, note

    def calibrate_rounds(self, model: nn.Module, processor: Any, images: Any, keep: float, rounds: int,
                         batch_size: int, **options: Any) -> Thresholds:
        return calibrate_rounds(model, processor, images, keep, rounds, batch_size, **options)

    def configure(self, model: nn.Module, thresholds: Any, mode: str, options: dict[str, Any]) -> RoundSettings:
        settings = self.round_settings(model, thresholds, mode, options)
        if settings.tower is None:
            unit_tower.remove(model.model.visual)
        else:
            unit_tower.install(model.model.visual, settings.tower)
        return settings

    def unpatch(self, model: nn.Module) -> None:
        unit_tower.remove(model.model.visual)

    def round_settings(self, model: nn.Module, thresholds: Any, mode: str, options: dict[str, Any]) -> RoundSettings:
        metric, temporal, window = options.get("metric"), options.get("temporal"), options.get("window")
        tower = options.get("tower")
        if tower is None and isinstance(thresholds, Thresholds):
            tower = thresholds.metadata.get("tower")
        tower = None if mode == "full" else tower_thresholds(model, tower)
        if tower is not None and window is not None:
            raise ValueError("with merging inside the tower, the rounds run on each image's whole unit grid: "
                             "window= does not apply")
        if tower is not None and isinstance(thresholds, BASELINES):
            raise ValueError("the matched-budget baselines reduce the vanilla tower's units: tower thresholds do "
                             "not apply with them")
        if isinstance(thresholds, BASELINES):
            if temporal is not None or window is not None:
                raise ValueError("the matched-budget baselines reduce each image's (time step's) units as a whole: "
                                 "temporal= and window= do not apply")
            if metric is not None:
                check_metric(metric)
            return RoundSettings(None, metric or "keys", reduction=None if mode == "full" else thresholds)
        unit_metric = unit_metric_of(thresholds, metric)
        rounds = None if mode == "full" else unit_round_thresholds(thresholds)
        if isinstance(thresholds, Thresholds):  # what calibrate_rounds / calibrate_temporal recorded
            temporal = thresholds.metadata.get("temporal") if temporal is None else temporal
            calibrated = thresholds.metadata.get("window")
            if window is not None and calibrated is not None and int(window) != calibrated:
                raise ValueError(f"these thresholds were calibrated with window={calibrated}, not {window}")
            window = calibrated if window is None else window
        check_window(window)
        if temporal is not None and not float(temporal) == float(temporal):
            raise ValueError("the temporal threshold is NaN")
        return RoundSettings(rounds, unit_metric, None if mode == "full" or temporal is None else float(temporal),
                             None if window is None else int(window), tower=tower)

    def encode(self, model: nn.Module, settings: RoundSettings, visual: VisualInput,
               arguments: dict[str, Any]) -> list[ImageTokens]:
        video = visual.kind == "video"
        return qwen_images(model, arguments[visual.pixels], arguments.get(visual.grid), settings.rounds, video=video,
                           metric=settings.metric, temporal=settings.temporal if video else None,
                           window=settings.window, reduction=settings.reduction)

    def baseline_grids(self, model: nn.Module, processor: Any, images: list[Any]) -> list[tuple[int, int]]:
        """Each image's unit grid, from the processor's own call (one prompt per image): what the
        baselines reduce."""
        return unit_grids(model, prompt_inputs(processor, images, [""] * len(images))["image_grid_thw"])

    def baseline_steps(self, model: nn.Module) -> tuple[int, int]:
        return rounds_steps(model)

    def vision_flops(self, model: nn.Module, inputs: dict[str, Any], accounting: dict[str, Any]) -> Optional[float]:
        return unit_tower.vision_flops(model, inputs, accounting)

    def item_inputs(self, inputs: dict[str, Any], first: int, count: int) -> dict[str, Any]:
        grids = inputs.get("image_grid_thw")
        return {} if grids is None else {"image_grid_thw": grids[first:first + count]}

    def positions(self, model: nn.Module, input_ids: Tensor, mask: Tensor, start: Tensor,
                  arguments: dict[str, Any]) -> Optional[Tensor]:
        grids = {k: arguments.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        return rope_positions(model, input_ids, mask, start, **grids)

    def item_lengths(self, model: nn.Module, visual: VisualInput, arguments: dict[str, Any]) -> list[int]:
        grids = arguments[visual.grid]
        return (grids.prod(-1) // model.config.vision_config.spatial_merge_size ** 2).tolist()


register(Qwen2VL())
