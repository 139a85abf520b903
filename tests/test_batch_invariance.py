"""Batch invariance with variable token counts (peers.md section 10, Test 3; design.md section 3).

Four images of very different redundancy (constant colour, pure noise, half constant / half
noise, checkerboard of patch-sized squares) merge to different token counts under one set of
thresholds. Each image must come out the same whether it is encoded alone, inside the batch,
or inside a permuted batch: counts, sizes, provenance (groups), valid features, pooled outputs
(CLS, SigLIP / timm MAP heads); padded slots have size 0 and are flagged in the padding mask.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dymu_viz
from dymu_viz import merge
from tiny_models import (PROTECTED, family_outputs, make_hf_clip, make_hf_siglip, make_open_clip, make_timm_map,
                         redundancy_images)

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# 64 patches per image, 4 layers, for every family
BUILDERS = {
    "hf_siglip": lambda: make_hf_siglip(image=112, patch=14),
    "hf_clip": lambda: make_hf_clip(image=112, patch=14),
    "timm_map": lambda: make_timm_map(layers=4, image=64, patch=8),
    "open_clip": lambda: make_open_clip(layers=4, image=64, patch=8),
}
GEOMETRY = {"hf_siglip": (112, 14), "hf_clip": (112, 14), "timm_map": (64, 8), "open_clip": (64, 8)}
THRESHOLDS = [0.62, 0.56, 0.5, 0.44]
PERMUTATION = [2, 0, 3, 1]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}
# margin between every edge score and its threshold: far above float32 round-off, so that a
# batch cannot flip a comparison through rounding alone (a premise of the test, checked below)
MARGIN = 1e-4


def model_pooled_output(family: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled output of the model's own call (pooler_output for HF, the return for the rest)."""
    out = family_outputs(family, model, x)
    return out["pooler_output"] if "pooler_output" in out else out["out"]


def check_image(batch: dymu_viz.EncoderResult, j: int, alone: dymu_viz.EncoderResult, tol: dict) -> None:
    """Row j of a batched result against the same image encoded alone (row 0)."""
    assert torch.equal(batch.counts[j], alone.counts[0]), (batch.counts[j], alone.counts[0])
    n = int(alone.counts[0, -1])
    assert alone.sizes.shape[1] == n and (alone.sizes[0] > 0).all()  # alone: no padding at all

    assert torch.equal(batch.sizes[j, :n], alone.sizes[0])
    assert torch.equal(batch.groups[j], alone.groups[0])
    assert (batch.sizes[j, n:] == 0).all()
    assert batch.padding_mask[j, n:].all() and not batch.padding_mask[j, :n].any()
    assert int(batch.n_tokens[j]) == n
    torch.testing.assert_close(batch.image_tokens(j), alone.image_tokens(0), **tol)

    for layer, (sb, sa, gb, ga) in enumerate(zip(batch.layer_sizes, alone.layer_sizes,
                                                  batch.layer_groups, alone.layer_groups)):
        n_l = int(alone.counts[0, layer])
        assert torch.equal(sb[j, :n_l], sa[0]), layer
        assert (sb[j, n_l:] == 0).all(), layer
        assert torch.equal(gb[j], ga[0]), layer
        assert bool(batch.layer_padding_mask(layer)[j, n_l:].all())

    for layer, (hb, ha) in enumerate(zip(batch.hidden_states, alone.hidden_states)):
        n_l = int(alone.counts[0, layer])
        torch.testing.assert_close(hb[j, :n_l], ha[0], **tol, msg=f"hidden state {layer}")

    torch.testing.assert_close(batch.pooled[j], alone.pooled[0], **tol)


class ScoreRecorder:
    """Wraps merge.select_threshold and keeps (scores, tau) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, float]] = []
        self.original = merge.select_threshold

    def __call__(self, best, size, tau, protected):
        self.calls.append((best.clone(), tau))
        return self.original(best, size, tau, protected)

    def min_margin(self) -> float:
        gaps = [(best[torch.isfinite(best)].double() - tau).abs().min() for best, tau in self.calls
                if torch.isfinite(best).any()]
        return float(torch.stack(gaps).min())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_each_image_is_the_same_alone_in_a_batch_and_in_a_permuted_batch(monkeypatch, family, dtype) -> None:
    model = BUILDERS[family]().to(dtype)
    size, patch = GEOMETRY[family]
    x = redundancy_images(size, patch, dtype)
    n0 = (size // patch) ** 2 + PROTECTED[family]
    dymu_viz.patch(model, thresholds=THRESHOLDS)
    tol = TOL[dtype]

    recorder = ScoreRecorder()
    monkeypatch.setattr(merge, "select_threshold", recorder)
    alone = [dymu_viz.encode(model, x[i:i + 1], output_hidden_states=True) for i in range(4)]
    monkeypatch.setattr(merge, "select_threshold", recorder.original)
    assert recorder.min_margin() > MARGIN, "test premise: an edge score sits too close to its threshold"

    final = [int(r.counts[0, -1]) for r in alone]
    assert len(set(final)) == 4, f"the four images should keep different token counts, got {final}"
    assert all(n < n0 for n in final)

    together = dymu_viz.encode(model, x, output_hidden_states=True)
    assert together.tokens.shape[:2] == (4, max(final))
    for i in range(4):
        check_image(together, i, alone[i], tol)

    permuted = dymu_viz.encode(model, x[PERMUTATION], output_hidden_states=True)
    for j, i in enumerate(PERMUTATION):
        check_image(permuted, j, alone[i], tol)

    # the model's own call (what users run) pools the same way, alone or batched
    pooled_batch = model_pooled_output(family, model, x)
    torch.testing.assert_close(pooled_batch, together.pooled, **tol)
    for i in range(4):
        torch.testing.assert_close(pooled_batch[i:i + 1], model_pooled_output(family, model, x[i:i + 1]), **tol)


def test_pooled_output_ignores_padding_content() -> None:
    """Whatever a padded slot holds, the SigLIP MAP head (log-size bias + padding mask) and the
    HF SigLIP last_hidden_state rows of valid tokens are unaffected."""
    model = BUILDERS["hf_siglip"]()
    x = redundancy_images(112, 14)
    dymu_viz.patch(model, thresholds=THRESHOLDS)
    result = dymu_viz.encode(model, x)
    assert result.padding_mask.any()
    pooled = model.dymu.adapter.pool(result)
    torch.testing.assert_close(pooled, result.pooled, atol=0, rtol=0)
    garbage = result.tokens.clone()
    garbage[result.padding_mask] = 1e3 * torch.randn_like(garbage[result.padding_mask])
    result.tokens = garbage
    torch.testing.assert_close(model.dymu.adapter.pool(result), pooled, atol=1e-5, rtol=1e-5)


HOST_READS = ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero")


@pytest.mark.parametrize("family", ["open_clip", "hf_siglip"])
def test_threshold_blocks_read_the_host_once_per_layer(monkeypatch, family) -> None:
    """The token counts decide the next layer's shapes, so every merging layer must read them
    once; nothing else in the block loop waits for the device (each read is a host sync on a
    GPU). A padded batch also lists its valid rows (nonzero) after a layer that merges."""
    from dymu_viz.adapters import base
    model = BUILDERS[family]()
    size, patch = GEOMETRY[family]
    x = redundancy_images(size, patch)
    dymu_viz.patch(model, thresholds=THRESHOLDS)
    reads: list[str] = []
    run_blocks = base.run_blocks

    def reading(name: str):
        original = getattr(torch.Tensor, name)
        return lambda self, *args, **kwargs: (reads.append(name), original(self, *args, **kwargs))[1]

    def counted(*args, **kwargs):  # the block loop with every host read of a tensor recorded
        with pytest.MonkeyPatch.context() as reads_patch:
            for name in HOST_READS:
                reads_patch.setattr(torch.Tensor, name, reading(name))
            return run_blocks(*args, **kwargs)

    monkeypatch.setattr(base, "run_blocks", counted)
    alone = dymu_viz.encode(model, x[1:2])  # noise: merges in some layers; every layer can merge
    layers = len(THRESHOLDS)
    assert reads == ["tolist"] * layers, reads
    reads.clear()
    batch = dymu_viz.encode(model, x)
    after = batch.counts[:, 1:]  # (B, layers) tokens after each layer
    merges = (after < batch.counts[:, :-1]).any(0)
    ragged = int((merges & (after.amax(0) > after.amin(0))).sum())  # layers whose merge pads the batch
    assert ragged > 0 and reads.count("tolist") == layers and reads.count("nonzero") == ragged
    assert len(reads) == layers + ragged, reads
    assert torch.equal(batch.counts[1], alone.counts[0])
