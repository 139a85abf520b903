"""dymu_viz against the reference DyMU code's own outputs (``shared/golden/reference_dtome.json``).

The golden file holds what the reference implementation computes at batch size 1 on randomly
initialised open_clip towers that are rebuilt here bit for bit (the weights checksum is checked
first): per-block token counts and the pooled output for DToMe with given thresholds and for
ToMe with a fixed r, and its batch-level threshold finding. Every inference case must agree
exactly in counts and to 1e-4 in the pooled output; the batch invariance of the reference
order is checked on the same images inside a mixed batch.
"""

from __future__ import annotations

import copy
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dymu_viz
from dymu_viz.data import PHOTOS

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "reference_dtome.json"
if not GOLDEN.is_file() and os.environ.get("CI"):
    raise RuntimeError(f"CI runs with ../shared beside the project, but {GOLDEN.name} is not in ../shared/golden: "
                       "the reference-fidelity tests must run in CI, not skip")
pytestmark = [pytest.mark.skipif(not GOLDEN.is_file(), reason="the shared golden files are not next to the project"),
              pytest.mark.exact_counts]


@lru_cache(maxsize=1)
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def golden_image(name: str) -> Image.Image:
    """The golden file's image recipe: bundled photos plus two synthetic arrays."""
    if name == "camera" or name == "coins":
        import skimage.data
        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if name == "flat":
        return Image.fromarray(np.full((256, 256, 3), (40, 160, 90), np.uint8)).convert("RGB")
    if name == "quadrants":
        a = np.zeros((256, 256, 3), np.uint8)
        a[:128, :128] = (255, 0, 0)
        a[:128, 128:] = (0, 255, 0)
        a[128:, :128] = (0, 0, 255)
        a[128:, 128:] = 255
        return Image.fromarray(a).convert("RGB")
    return PHOTOS[name]()


@lru_cache(maxsize=None)
def reference_tower(name: str):
    """(visual tower, eval transform) built exactly as the golden file's ``weights`` says."""
    import open_clip

    torch.manual_seed(1)
    quick = {"force_quick_gelu": True} if "force_quick_gelu=True" in golden()["models"][name]["weights"] else {}
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **quick)
    visual = model.visual.eval()
    checksum = sum(float(t.double().sum()) for t in visual.state_dict().values())
    expected = golden()["models"][name]["weights_checksum_sum_of_visual_state_dict_float64"]
    # torch's CPU normal_ draws float32 samples with vectorized (AVX2 / AVX-512) or scalar code,
    # which differ in the last bit: under ATEN_CPU_CAPABILITY=default the rebuilt weights are the
    # golden ones to float32 rounding (checksum ~1e-8 apart), not bitwise. Every golden count still
    # holds there (CI's second leg runs this file under those kernels).
    vectorized = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    assert checksum == pytest.approx(expected, rel=1e-12 if vectorized else 1e-7, abs=1e-6), \
        "the rebuilt tower's weights differ"
    return visual, preprocess


@lru_cache(maxsize=None)
def pixels(name: str, image: str) -> torch.Tensor:
    return reference_tower(name)[1](golden_image(image))[None]


def cases(mode: str) -> list[tuple[str, str, str]]:
    out = []
    for model, entry in golden()["models"].items() if GOLDEN.is_file() else ():
        if mode == "threshold":
            out += [(model, config, image) for config, c in entry["threshold"].items() for image in c["per_image"]]
        else:
            out += [(model, "fixed_r", image) for image in entry["fixed_r"]["per_image"]]
    return out


def run_case(model_name: str, mode: str, config: str, image: str):
    visual, _ = reference_tower(model_name)
    entry = golden()["models"][model_name]
    if mode == "threshold":
        dymu_viz.patch(visual, thresholds=entry["threshold"][config]["taus"])
        expected = entry["threshold"][config]["per_image"][image]
    else:
        dymu_viz.patch(visual, r=entry["fixed_r"]["r_per_layer"])
        expected = entry["fixed_r"]["per_image"][image]
    try:
        with torch.no_grad():
            result = dymu_viz.encode(visual, pixels(model_name, image))
    finally:
        dymu_viz.unpatch(visual)
    return result, expected


def assert_matches(result, expected) -> None:
    assert result.counts[0, 1:].tolist() == expected["counts"]
    pooled = result.pooled[0]
    assert torch.allclose(pooled[:8], torch.tensor(expected["pooled_first8"]), atol=1e-4, rtol=0), \
        (pooled[:8].tolist(), expected["pooled_first8"])
    assert float(pooled.norm()) == pytest.approx(expected["pooled_norm"], abs=1e-3)


@pytest.mark.floor
@pytest.mark.parametrize("model_name,config,image", cases("threshold"))
def test_threshold_mode_reproduces_reference(model_name: str, config: str, image: str) -> None:
    assert_matches(*run_case(model_name, "threshold", config, image))


@pytest.mark.floor
@pytest.mark.parametrize("model_name,config,image", cases("fixed_r"))
def test_fixed_r_reproduces_reference(model_name: str, config: str, image: str) -> None:
    assert_matches(*run_case(model_name, "fixed_r", config, image))


MIXED = ["astronaut", "flat", "rocket", "quadrants", "china"]


@pytest.mark.parametrize("model_name", list(golden()["models"]) if GOLDEN.is_file() else [])
@pytest.mark.parametrize("config", ["ramp", "fixed_r"])
def test_reference_order_is_batch_invariant(model_name: str, config: str) -> None:
    """Each golden image alone equals itself inside a mixed batch of 5: counts, groups, order.

    The order rule looks at the image alone, so this is exact in the algorithm. Numerically, a
    padded batch rounds differently from a single image (other matrix shapes, masked softmax):
    float32 scores move by ~1e-7. Without a CLS token the unmerged A tokens are ordered by
    score, and the flat image's near-equal scores (1 ulp apart) then swap rows; so the CLS-less
    tower is checked in float64, where rounding is 1e-16 and such a swap would be a real bug.
    """
    visual, _ = reference_tower(model_name)
    dtype = torch.float32 if dymu_viz.patch(visual).dymu.adapter.protected else torch.float64
    dymu_viz.unpatch(visual)
    visual = copy.deepcopy(visual).to(dtype)
    entry = golden()["models"][model_name]
    settings = {"r": entry["fixed_r"]["r_per_layer"]} if config == "fixed_r" else \
        {"thresholds": entry["threshold"][config]["taus"]}
    batch = torch.cat([pixels(model_name, name) for name in MIXED]).to(dtype)
    dymu_viz.patch(visual, **settings)
    with torch.no_grad():
        together = dymu_viz.encode(visual, batch)
        alone = [dymu_viz.encode(visual, batch[b: b + 1]) for b in range(len(MIXED))]
    assert len(set(together.n_tokens.tolist())) > 1 or config == "fixed_r", "the batch must mix token counts"
    for b, one in enumerate(alone):
        n = int(one.n_tokens[0])
        assert torch.equal(together.counts[b], one.counts[0])
        for layer_t, layer_o in zip(together.layer_groups, one.layer_groups):
            assert torch.equal(layer_t[b], layer_o[0])  # same group ids = same rows = same order
        assert torch.equal(together.sizes[b, :n], one.sizes[0, :n])
        assert torch.allclose(together.tokens[b, :n], one.tokens[0, :n], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Threshold finding against the reference's batch-level calibration
# ---------------------------------------------------------------------------------------------

BF16_STEP = 2.0 ** -8


def calibration_cases() -> list[tuple[str, str]]:
    if not GOLDEN.is_file():
        return []
    return [(m, c) for m, entry in golden()["models"].items() for c in entry["calibration"]]


def calibrate_like_golden(model_name: str, case: str) -> tuple[list[float], list[float], list[int]]:
    """(our thresholds, the reference's, r per layer) on the golden batches."""
    from dymu_viz.calibrate import find_thresholds

    visual, _ = reference_tower(model_name)
    c = golden()["models"][model_name]["calibration"][case]
    batches = [torch.cat([pixels(model_name, image) for image in batch]) for batch in c["batches"]]
    try:
        found = find_thresholds(visual, batches, r_total=c["r_total"], schedule=c["schedule"])
    finally:
        dymu_viz.unpatch(visual)
    assert found.r == c["r_per_layer"]
    return found.values, c["thresholds"], found.r


@pytest.mark.floor
@pytest.mark.parametrize("model_name,case", calibration_cases())
def test_calibration_within_one_bf16_step_of_reference(model_name: str, case: str) -> None:
    """Every active layer within 2^-8 of the reference (measured: at most 2.7e-3 for ViT-B-16,
    8.5e-5 for SigLIP); layers with r = 0 never merge (ours +inf, the reference's 1.0 sentinel)."""
    ours, reference, r = calibrate_like_golden(model_name, case)
    for i, (a, b, r_i) in enumerate(zip(ours, reference, r)):
        if r_i == 0:
            assert a == float("inf") and b == 1.0, i
        else:
            assert abs(a - b) < BF16_STEP, (i, a, b)
    assert ours[0] == pytest.approx(reference[0], abs=1e-6)  # before any merge both orders agree


def reference_batched_rows(src, best, size, protected):
    """The reference's batched order, reproduced for this test only: every image of the batch is
    laid out [A slots, B slots], merged A slots and old padding flagged, then sorted valid-first
    by torch's *unstable* argsort of that float flag (CLS pinned), whatever order that gives."""
    B, N = size.shape
    valid = size > 0
    flag = torch.cat([~valid[:, ::2] | src, ~valid[:, 1::2]], dim=1).float()
    slot = torch.cat([torch.arange(0, N, 2), torch.arange(1, N, 2)])
    if protected:
        perm = torch.cat([torch.zeros(B, 1, dtype=torch.long), 1 + torch.argsort(flag[:, 1:], dim=1)], dim=1)
    else:
        perm = torch.argsort(flag, dim=1)
    rows = torch.full((B, N), -1, dtype=torch.long)
    for b in range(B):
        kept = perm[b][flag[b, perm[b]] == 0]
        rows[b, slot[kept]] = torch.arange(kept.numel())
    return rows


@pytest.mark.parametrize("model_name,case", calibration_cases())
def test_calibration_residual_is_the_reference_batched_order(monkeypatch, model_name: str, case: str) -> None:
    """Why the thresholds above differ at all: with the reference's batched token order and its
    division by ``size + 1e-4`` substituted into our calibration, the thresholds agree to float32
    round-off. So the selection rule, the batch value and the batch mean are the reference's
    exactly; only its order (an artifact of an unstable sort) and the 1e-4 are not reproduced."""
    from dymu_viz import merge

    merge_tokens = merge.merge_tokens

    def merge_then_divide(x, size, groups, src, dst, best, protected, n_new=None):
        x, size, groups = merge_tokens(x, size, groups, src, dst, best, protected, n_new)
        return x * (size / (size + 1e-4))[..., None].to(x.dtype), size, groups

    monkeypatch.setattr(merge, "survivor_rows", reference_batched_rows)
    monkeypatch.setattr(merge, "merge_tokens", merge_then_divide)
    ours, reference, r = calibrate_like_golden(model_name, case)
    for a, b, r_i in zip(ours, reference, r):
        if r_i:
            assert abs(a - b) < 5e-6
