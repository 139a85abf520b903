"""Matched-budget baselines for DyMU, on every family's own grid: the tower's patches where
DyMU merges inside the tower (LLaVA-1.5, LLaVA-OneVision), each image's (tile's) units where it
merges in rounds after the tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL3).

DyMU's token count depends on the image; to compare it fairly, each baseline is sized so that
its *mean* count on the same images equals DyMU's:

* ``ToMe``: fixed r per tower layer or per round (the same count for every crop or image), as in ToMe;
* ``Pool``: uniform 2-D average pooling of each crop's (image's) grid to rows x cols cells;
* ``RandomPrune``: ``keep`` patches (units) of each crop (image) drawn at random (seeded), the rest dropped.

The reductions themselves are in ``dymu_viz.vlm.reductions``; they run through the same LLM
path as DyMU: ``patch_vlm(model, ToMe(...) | Pool(...) | RandomPrune(...), mode=...)``.

    target = mean_image_tokens(model, processor, images)           # under DyMU's patch_vlm
    pool = match_budget(model, processor, images, target, "pool")  # Pool(rows, cols)
    vlm.patch_vlm(model, pool)
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .family import family_of
from .pipeline import encode_images, patch_vlm, prompt_inputs
from .reductions import (KINDS, Baseline, Pool, RandomPrune, ToMe, pool_grids, pool_groups,  # noqa: F401
                         pool_patches, random_keep, tome_r)

__all__ = ["KINDS", "Baseline", "Pool", "RandomPrune", "ToMe", "image_token_counts", "match_budget", "mean_image_tokens",
           "pool_grids", "pool_groups", "pool_patches", "random_keep", "size_classes", "size_key", "tome_r"]


def image_token_counts(model: nn.Module, processor: Any, images: Sequence[Any], batch_size: int = 8) -> list[int]:
    """Compact image tokens of each image (what the LLM computes on: for OneVision with its
    newline tokens) under the patched ``model``, one image per prompt (``pipeline.encode_images``)."""
    return [len(t.features) for t in encode_images(model, processor, images, batch_size)]


def mean_image_tokens(model: nn.Module, processor: Any, images: Sequence[Any], batch_size: int = 8) -> float:
    """Mean of ``image_token_counts``."""
    counts = image_token_counts(model, processor, images, batch_size)
    if not counts:
        raise ValueError("no images to count tokens on")
    return sum(counts) / len(counts)


def size_key(processor: Any, image: Any) -> tuple:
    """What a baseline's count can depend on besides the pixels: the shapes and integer fields
    (crops, grids, sizes) of ``image`` processed alone."""
    inputs = prompt_inputs(processor, [image], [""])  # the processor's own call: its defaults apply
    return tuple((name, tuple(v.shape), None if v.is_floating_point() else tuple(v.flatten().tolist()))
                 for name, v in sorted(inputs.items()) if torch.is_tensor(v))


def size_classes(processor: Any, images: Sequence[Any]) -> list[tuple[Any, int]]:
    """One image per distinct ``size_key`` with the number of ``images`` that share it, in
    first-seen order: where a baseline's count ignores the pixels, one image of each class
    measures them all."""
    classes: dict[tuple, list] = {}
    for image in images:
        classes.setdefault(size_key(processor, image), [image, 0])[1] += 1
    return [(image, count) for image, count in classes.values()]


def match_budget(model: nn.Module, processor: Any, images: Sequence[Any], target: float, kind: str,
                 mode: str = "vtu", batch_size: int = 8, seed: int = 0) -> Baseline:
    """The ``kind`` baseline ("tome", "pool" or "random") whose mean image tokens on ``images``
    is closest to ``target`` (e.g. a DyMU run's ``mean_image_tokens``): a binary search over
    ToMe's merges per crop (image), the pooling grids of ``pool_grids`` or the patches (units)
    random pruning keeps (drawn with ``seed``), on the family's grid (``baseline_grid``, the
    smallest of ``images``), measuring with the real tower each time, on one image of each of
    ``size_classes`` where the family's baseline counts ignore the pixels. The model is
    left patched with the result (``mode`` as in ``patch_vlm``); ``measured`` holds its mean."""
    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
    if mode == "full":
        raise ValueError('mode="full" merges nothing, so no budget can be matched; use "vtu" or "compact"')
    family = family_of(model)
    if not family.baselines:
        raise ValueError(f"the {family.title} family has no matched-budget baselines")
    rows, cols = family.baseline_grid(model, processor, images)
    if kind == "tome":
        steps_run, steps = family.baseline_steps(model)
        candidates: list[Baseline] = [ToMe(tome_r(m, steps_run, steps)) for m in range(rows * cols)]
    elif kind == "pool":  # like ToMe: the count falls along the list
        candidates = [Pool(r, c) for r, c in pool_grids(min(rows, cols))]
    else:
        candidates = [RandomPrune(keep, seed) for keep in range(rows * cols, 0, -1)]

    if not images:
        raise ValueError("no images to count tokens on")
    classes = size_classes(processor, images) if family.baseline_counts_by_size else [(image, 1) for image in images]
    shown = [image for image, _ in classes]

    def measure(i: int) -> float:
        patch_vlm(model, candidates[i], mode=mode)
        counts = image_token_counts(model, processor, shown, batch_size)
        return sum(c * n for c, (_, n) in zip(counts, classes)) / len(images)

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
