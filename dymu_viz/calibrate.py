"""Threshold finding (spec section 3.2): per layer, on the tokens surviving earlier layers,
merge the B*r_i best edges of the whole batch and record the best edge not merged; the
threshold is the running mean of these per-batch values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .encoder import MergeConfig
from .patch import get_state, patch
from .schedule import kout_r_total, make_schedule
from .thresholds import Thresholds


@dataclass
class RunningThresholds:
    """Per-layer running mean of batch thresholds, with an explicit count per layer (a layer
    whose batches never leave an edge unpicked has count 0 and threshold None)."""

    sums: list[float]
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.sums)

    @classmethod
    def empty(cls, layers: int) -> "RunningThresholds":
        return cls([0.0] * layers)

    def update(self, batch_values: list[Optional[float]]) -> None:
        for i, v in enumerate(batch_values):
            if v is not None:
                self.sums[i] += v
                self.counts[i] += 1

    def means(self) -> list[Optional[float]]:
        return [s / c if c else None for s, c in zip(self.sums, self.counts)]


def resolve_r(depth: int, n_patches: int, r_total: Optional[int] = None, target: Optional[str] = None,
              schedule: str = "constant") -> tuple[int, list[int]]:
    """(r_total, per-layer r) from either r_total or a "Kout" target such as "72out"."""
    if (r_total is None) == (target is None):
        raise ValueError("give exactly one of r_total or target (e.g. target='72out')")
    if target is not None:
        r_total = kout_r_total(target, n_patches)
    return r_total, make_schedule(r_total, depth, schedule)


@torch.no_grad()
def batch_thresholds(model: nn.Module, pixels: Tensor, r: list[int]) -> list[Optional[float]]:
    """One calibration step: the per-layer batch threshold of one batch of pixels."""
    state = get_state(model) or get_state(patch(model))
    return state.run(pixels, config=MergeConfig("calibrate", None, list(r))).batch_thresholds


def find_thresholds(model: nn.Module, batches: Iterable[Tensor], r_total: Optional[int] = None,
                    target: Optional[str] = None, schedule: str = "constant", name: str = "") -> Thresholds:
    """Calibrate thresholds of ``model``'s encoder over an iterable of pixel batches.

    Layers that never produced a value (r_i = 0, or every edge always picked) get +inf,
    which means "never merge"."""
    state = get_state(model) or get_state(patch(model))
    depth = state.depth
    grid = state.adapter.expected_size()
    ph, pw = state.adapter.patch_size()
    n_patches = (grid[0] // ph) * (grid[1] // pw)
    r_total, rs = resolve_r(depth, n_patches, r_total, target, schedule)
    running = RunningThresholds.empty(depth)
    n_images = n_batches = 0
    for pixels in batches:
        running.update(batch_thresholds(model, pixels, rs))
        n_images += pixels.shape[0]
        n_batches += 1
    if n_images == 0:
        raise ValueError("calibration got no images; check the dataset")
    values = [v if v is not None else float("inf") for v in running.means()]
    return Thresholds(values, rs, model=name, schedule=schedule, r_total=r_total,
                      metadata={"n_images": n_images, "n_batches": n_batches})
