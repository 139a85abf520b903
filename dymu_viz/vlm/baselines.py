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

import warnings
from typing import Any, Sequence

import torch
from torch import nn

from .family import family_of
from .pipeline import encode_images, patch_vlm, prompt_inputs
from .reductions import (KINDS, Baseline, Pool, RandomPrune, ToMe, pool_grids, pool_groups,  # noqa: F401
                         pool_patches, random_keep, tome_r)

__all__ = ["KINDS", "Baseline", "Pool", "RandomPrune", "ToMe", "image_token_counts", "match_budget", "mean_image_tokens",
           "pool_grids", "pool_groups", "pool_patches", "random_keep", "sample_images", "size_classes", "size_key",
           "tome_r"]


Sample = Any  # an image, or a list of images asked about together in one prompt


def sample_images(sample: Sample) -> list[Any]:
    """The images of one sample: a list as it is, else the single image."""
    return list(sample) if isinstance(sample, (list, tuple)) else [sample]


def image_token_counts(model: nn.Module, processor: Any, samples: Sequence[Sample], batch_size: int = 8) -> list[int]:
    """Compact image tokens of each sample (what the LLM computes on: for OneVision with its
    newline tokens) under the patched ``model``, one prompt per sample: an image, or a list of
    images asked about together, which a family may treat otherwise than alone (OneVision: base
    crops only). The pixels come from ``processor``'s own call, so a processor that prepares
    pictures first (``dymu_viz.eval.HarnessProcessor``: as an lmms-eval run does) is measured as used."""
    tokens = encode_images(model, processor, samples, batch_size)
    counts, start = [], 0
    for sample in samples:
        n = len(sample_images(sample))
        counts.append(sum(len(t.features) for t in tokens[start:start + n]))
        start += n
    return counts


def mean_image_tokens(model: nn.Module, processor: Any, samples: Sequence[Sample], batch_size: int = 8) -> float:
    """Mean of ``image_token_counts``: per sample (per image when every sample is one image)."""
    counts = image_token_counts(model, processor, samples, batch_size)
    if not counts:
        raise ValueError("no images to count tokens on")
    return sum(counts) / len(counts)


def size_key(processor: Any, sample: Sample) -> tuple:
    """What a baseline's count can depend on besides the pixels: the shapes and integer fields
    (crops, grids, sizes) of ``sample`` (an image or a list of images) processed as one prompt."""
    inputs = prompt_inputs(processor, [sample], [""])  # the processor's own call: its defaults apply
    return tuple((name, tuple(v.shape), None if v.is_floating_point() else tuple(v.flatten().tolist()))
                 for name, v in sorted(inputs.items()) if torch.is_tensor(v))


def size_classes(processor: Any, samples: Sequence[Sample]) -> list[tuple[Any, int]]:
    """One sample per distinct ``size_key`` with the number of ``samples`` that share it, in
    first-seen order: where a baseline's count ignores the pixels, one sample of each class
    measures them all."""
    classes: dict[tuple, list] = {}
    for sample in samples:
        classes.setdefault(size_key(processor, sample), [sample, 0])[1] += 1
    return [(sample, count) for sample, count in classes.values()]


def match_budget(model: nn.Module, processor: Any, samples: Sequence[Sample], target: float, kind: str,
                 mode: str = "vtu", batch_size: int = 8, seed: int = 0, tolerance: float = 0.05) -> Baseline:
    """The ``kind`` baseline ("tome", "pool" or "random") whose mean image tokens per sample on
    ``samples`` (images, or lists of images asked about together) is closest to ``target`` (e.g.
    a DyMU run's mean per sample): a binary search over ToMe's merges per crop (image), the
    pooling grids of ``pool_grids`` or the patches (units) random pruning keeps (drawn with
    ``seed``), on the family's grids (``baseline_grids``; pooling and pruning fit the smallest),
    measuring with the real tower each time, on one sample of each of ``size_classes`` where the
    family's baseline counts ignore the pixels. Measure with the processor the evaluation uses
    (``dymu_viz.eval.HarnessProcessor`` for an lmms-eval run). The model is left patched with
    the result (``mode`` as in ``patch_vlm``); ``measured`` holds its mean. A result further
    than ``tolerance`` (a share of the target) from it warns: images of very different sizes
    can put a fixed budget out of reach."""
    if kind not in KINDS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
    if mode == "full":
        raise ValueError('mode="full" merges nothing, so no budget can be matched; use "vtu" or "compact"')
    family = family_of(model)
    if not family.baselines:
        raise ValueError(f"the {family.title} family has no matched-budget baselines")
    if not samples:
        raise ValueError("no images to count tokens on")
    grids = family.baseline_grids(model, processor, [im for sample in samples for im in sample_images(sample)])
    rows, cols = min(h for h, _ in grids), min(w for _, w in grids)
    if kind == "tome":  # up to the largest grid: ToMe's cap per step keeps smaller ones valid
        steps_run, steps = family.baseline_steps(model)
        candidates: list[Baseline] = [ToMe(tome_r(m, steps_run, steps)) for m in range(max(h * w for h, w in grids))]
    elif kind == "pool":  # like ToMe: the count falls along the list
        candidates = [Pool(r, c) for r, c in pool_grids((rows, cols))]
    else:
        candidates = [RandomPrune(keep, seed) for keep in range(rows * cols, 0, -1)]

    classes = size_classes(processor, samples) if family.baseline_counts_by_size else [(s, 1) for s in samples]
    shown = [sample for sample, _ in classes]

    def measure(i: int) -> float:
        patch_vlm(model, candidates[i], mode=mode)
        counts = image_token_counts(model, processor, shown, batch_size)
        return sum(c * n for c, (_, n) in zip(counts, classes)) / len(samples)

    low, high = 0, len(candidates) - 1  # the count falls from low to high
    counts = {low: measure(low), high: measure(high)}
    while high - low > 1:
        middle = (low + high) // 2
        counts[middle] = measure(middle)
        low, high = (middle, high) if counts[middle] >= target else (low, middle)
    best = min((low, high), key=lambda i: abs(counts[i] - target))
    chosen = candidates[best]
    patch_vlm(model, chosen, mode=mode)
    if abs(counts[best] - target) > tolerance * target:
        warnings.warn(f"the closest {kind} baseline keeps {counts[best]:.1f} image tokens per sample against a target "
                      f"of {target:.1f} ({100 * (counts[best] / target - 1):+.0f} %): of these images' grids "
                      f"(the smallest {rows} x {cols}) no {kind} setting comes closer", stacklevel=2)
    return type(chosen)(**{**chosen.__dict__, "measured": counts[best]})
