"""Run by tests under torchrun (and alone): calibrate_temporal on three small clips, the result's
temporal threshold written by rank 0 to the JSON file named by argv[1]."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from dymu_viz import Thresholds
from dymu_viz.vlm.qwen import ROUNDS_KIND, calibrate_temporal
from tiny_models import tiny_qwen


def clips() -> list[np.ndarray]:
    """A still clip, a pan of one patch per frame, and the still one with noise: 3 time steps each."""
    rng = np.random.default_rng(2)
    still = np.repeat(rng.integers(0, 255, (1, 84, 112, 3), dtype=np.uint8), 6, 0)
    pan = np.stack([np.roll(still[0], 14 * k, axis=1) for k in range(6)])
    noisy = (still.astype(int) + rng.integers(-40, 40, still.shape)).clip(0, 255).astype(np.uint8)
    return [still, pan, noisy]


def rounds() -> Thresholds:
    return Thresholds([0.5, 0.5], [0, 0], metadata={"kind": ROUNDS_KIND, "metric": "keys"})


def main(out: str) -> None:
    if "RANK" in __import__("os").environ:
        dist.init_process_group("gloo")
    model, processor = tiny_qwen("2.5")
    with torch.no_grad():
        tau = calibrate_temporal(model, processor, clips(), rounds(), keep=0.6, progress=False).metadata["temporal"]
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"temporal": tau}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
