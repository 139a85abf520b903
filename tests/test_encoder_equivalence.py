"""Patched encoders against unpatched ones, and DToMe against ToMe (dymu-spec.md sections 2 and
10; peers.md section 10, Test 2; design.md section 3).

* merging off (no settings, tau = +inf, r = 0) gives the unpatched model's outputs, and
  ``unpatch`` restores the original model exactly;
* thresholds placed between the r-th and (r+1)-th best edge reproduce ToMe with r, layer after
  layer, bit for bit (float64);
* tau = -inf is ToMe with an unbounded r (the per-layer cap);
* identical patches merge the cap in every layer, giving closed-form token counts, and the
  surviving token equals the token of the unmerged model (proportional attention is exact);
* threshold mode is deterministic and runs in bf16 / fp16 / float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dymu_viz
from dymu_viz import merge
from dymu_viz.schedule import token_counts
from tiny_models import (FACTORIES, FAMILIES, PROTECTED, family_outputs, flatten_outputs, image_size,
                         make_hf_clip, make_hf_siglip, make_open_clip, make_timm_map, patch_size,
                         redundancy_images, zero_position_embedding)

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def n_tokens(family: str, model: nn.Module) -> int:
    return (image_size(model) // patch_size(model)) ** 2 + PROTECTED[family]


def assert_same_result(a: dymu_viz.EncoderResult, b: dymu_viz.EncoderResult) -> None:
    """Bitwise equality of everything two encoder results know."""
    assert torch.equal(a.counts, b.counts), (a.counts, b.counts)
    assert torch.equal(a.sizes, b.sizes)
    assert torch.equal(a.groups, b.groups)
    assert torch.equal(a.tokens, b.tokens)
    assert len(a.layer_sizes) == len(b.layer_sizes)
    for sa, sb, ga, gb in zip(a.layer_sizes, b.layer_sizes, a.layer_groups, b.layer_groups):
        assert torch.equal(sa, sb)
        assert torch.equal(ga, gb)
    assert (a.pooled is None) == (b.pooled is None)
    if a.pooled is not None:
        assert torch.equal(a.pooled, b.pooled)


# ---------------------------------------------------------------------------------------------
# Merging off == unpatched; unpatch restores the model
# ---------------------------------------------------------------------------------------------

OFF_SETTINGS = {
    "patch()": ({}, "off"),
    "tau=inf": ({"thresholds": float("inf")}, "threshold"),
    "r=0": ({"r": 0}, "fixed_r"),
}
VARIANTS = list(FAMILIES) + ["open_clip_tokens"]


def build_variant(variant: str) -> tuple[str, nn.Module]:
    if variant == "open_clip_tokens":
        return "open_clip", make_open_clip(output_tokens=True)
    return variant, FACTORIES[variant]()


@pytest.mark.parametrize("setting", list(OFF_SETTINGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_merging_off_matches_unpatched_and_unpatch_restores(variant: str, setting: str) -> None:
    family, model = build_variant(variant)
    kwargs, mode = OFF_SETTINGS[setting]
    torch.manual_seed(123)
    x = torch.randn(2, 3, image_size(model), image_size(model))
    cls = type(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    before = flatten_outputs(family_outputs(family, model, x))

    assert dymu_viz.patch(model, **kwargs) is model
    assert model.dymu.mode == mode
    assert type(model) is not cls and isinstance(model, cls) and "forward" not in model.__dict__
    patched = flatten_outputs(family_outputs(family, model, x))
    assert patched.keys() == before.keys()
    for name in before:
        assert patched[name].shape == before[name].shape, name
        assert patched[name].dtype == before[name].dtype, name
        torch.testing.assert_close(patched[name], before[name], atol=1e-5, rtol=0, msg=name)
    # nothing merged: every layer keeps every token, every token has size 1
    last = model.dymu.last
    assert (last.counts == n_tokens(family, model)).all()
    assert (last.sizes == 1).all()

    assert dymu_viz.unpatch(model) is model
    assert type(model) is cls and "forward" not in model.__dict__
    assert model.forward.__func__ is cls.forward
    assert not hasattr(model, "dymu")
    after = flatten_outputs(family_outputs(family, model, x))
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    for k in state_before:
        assert torch.equal(state_after[k], state_before[k]), k


def test_patch_twice_only_changes_settings_and_unpatch_restores() -> None:
    model = make_hf_clip()
    x = redundancy_images(56, 14)
    before = model(pixel_values=x).pooler_output
    dymu_viz.patch(model, thresholds=0.5)
    state, patched_cls = model.dymu, type(model)
    dymu_viz.patch(model, r=2)
    assert model.dymu is state and type(model) is patched_cls
    assert state.mode == "fixed_r" and state.r == [2] * 4
    model(pixel_values=x)
    assert (state.last.counts[:, -1] == 17 - 8).all()
    dymu_viz.unpatch(model)
    assert torch.equal(model(pixel_values=x).pooler_output, before)


def test_open_clip_timm_trunk_wrapper_is_patched_through_its_trunk() -> None:
    """open_clip's SigLIP towers are a TimmModel whose ``trunk`` is a timm ViT."""
    from open_clip.timm_model import TimmModel
    wrapper = TimmModel.__new__(TimmModel)
    nn.Module.__init__(wrapper)
    wrapper.trunk = make_timm_map()
    wrapper.head = nn.Sequential(nn.Linear(64, 16))
    wrapper.image_size = (64, 64)
    wrapper.eval()
    x = redundancy_images(64, 16)
    before = wrapper(x)

    dymu_viz.patch(wrapper, thresholds=float("inf"))
    assert wrapper.dymu is wrapper.trunk.dymu
    torch.testing.assert_close(wrapper(x), before, atol=1e-5, rtol=0)

    wrapper.dymu.thresholds = 0.5
    out = wrapper(x)
    last = wrapper.dymu.last
    assert (last.counts[:, -1] < 16).any()  # it does merge
    assert torch.equal(out, wrapper.head(last.pooled))  # and the wrapper used the merged trunk

    dymu_viz.unpatch(wrapper)
    assert not hasattr(wrapper, "dymu") and not hasattr(wrapper.trunk, "dymu")
    assert type(wrapper.trunk).__name__ == "VisionTransformer" and "forward" not in wrapper.trunk.__dict__
    assert torch.equal(wrapper(x), before)


# ---------------------------------------------------------------------------------------------
# DToMe <-> ToMe over several layers (peers Test 2.2)
# ---------------------------------------------------------------------------------------------

class FixedRRecorder:
    """Wraps merge.select_fixed_r and keeps, per call, the edge scores and the effective r."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        self.original = merge.select_fixed_r

    def __call__(self, best, size, r, protected):
        self.calls.append((best.clone(), size.clone(), r, protected))
        return self.original(best, size, r, protected)


@pytest.mark.parametrize("factory, protected", [(make_hf_clip, 1), (make_hf_siglip, 0)],
                         ids=["hf_clip_cls", "hf_siglip_no_cls"])
def test_thresholds_between_rth_and_next_edge_reproduce_tome(monkeypatch, factory, protected) -> None:
    model = factory(image=112, patch=14).double()  # 64 patches, 4 layers
    n0 = 64 + protected
    rs = [6, 4, 5, 3]
    torch.manual_seed(7)
    x = torch.randn(1, 3, 112, 112, dtype=torch.float64)

    recorder = FixedRRecorder()
    monkeypatch.setattr(merge, "select_fixed_r", recorder)
    dymu_viz.patch(model, r=rs)
    tome = dymu_viz.encode(model, x)
    monkeypatch.setattr(merge, "select_fixed_r", recorder.original)

    assert tome.counts[0].tolist() == token_counts(n0, rs, protected)
    assert len(recorder.calls) == len(rs)

    taus = []
    for layer, (best, size, r, prot) in enumerate(recorder.calls):
        assert r == rs[layer] and prot == protected
        scores = best[0][torch.isfinite(best[0])].sort(descending=True).values
        m = min(r, int(merge.merge_cap(size, protected)[0]))
        assert m == r  # the cap never binds here, so tau really reproduces r
        hi, lo = float(scores[m - 1]), float(scores[m])
        assert hi > lo, f"tied edge scores at layer {layer}: this input cannot tell tau from r"
        tau = (hi + lo) / 2
        assert lo < tau < hi
        taus.append(tau)

    dymu_viz.patch(model, thresholds=taus)
    assert model.dymu.mode == "threshold"
    dtome = dymu_viz.encode(model, x)
    assert_same_result(dtome, tome)

    # the same thresholds, nudged just past an edge, change the count in that layer
    first = recorder.calls[0][0][0].sort(descending=True).values
    nudged = list(taus)
    nudged[0] = float(first[rs[0]] + first[rs[0] + 1]) / 2
    dymu_viz.patch(model, thresholds=nudged)
    assert int(dymu_viz.encode(model, x).counts[0, 1]) == n0 - rs[0] - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_tau_minus_inf_equals_unbounded_r(family: str) -> None:
    model = FACTORIES[family]().double()
    size, patch = image_size(model), patch_size(model)
    x = redundancy_images(size, patch, torch.float64)
    dymu_viz.patch(model, thresholds=float("-inf"))
    dtome = dymu_viz.encode(model, x)
    dymu_viz.patch(model, r=10**6)
    tome = dymu_viz.encode(model, x)
    assert_same_result(dtome, tome)
    expected = token_counts(n_tokens(family, model), [10**6] * model.dymu.depth, PROTECTED[family])
    assert dtome.counts.tolist() == [expected] * x.shape[0]


# ---------------------------------------------------------------------------------------------
# "All patches identical": every layer merges the cap (peers Test 2.6)
# ---------------------------------------------------------------------------------------------

def _layout_clip_l14_336():
    return "hf_clip", make_hf_clip(layers=24, hidden=32, heads=2, image=336, patch=14)


def _layout_vit_b16():
    return "open_clip", make_open_clip(layers=12, hidden=32, heads=2, image=224, patch=16)


def _layout_siglip_so400m():
    return "hf_siglip", make_hf_siglip(layers=27, hidden=32, heads=2, image=384, patch=14)


def _layout_siglip_b16_384():
    return "timm_map", make_timm_map(layers=12, hidden=32, heads=2, image=384, patch=16)


# golden prefixes from peers.md Test 2.6; the last value repeats for the remaining layers
CAP_LAYOUTS = {
    "clip_l14_336": (_layout_clip_l14_336, [577, 289, 145, 73, 37, 19, 10, 6, 4, 3, 2], 576),
    "vit_b16_224": (_layout_vit_b16, [197, 99, 50, 26, 14, 8, 5, 3, 2], 196),
    "siglip_so400m_384": (_layout_siglip_so400m, [729, 365, 183, 92, 46, 23, 12, 6, 3, 2, 1], 729),
    "siglip_b16_384": (_layout_siglip_b16_384, [576, 288, 144, 72, 36, 18, 9, 5, 3, 2, 1], 576),
}


@pytest.mark.parametrize("layout", list(CAP_LAYOUTS))
def test_identical_patches_merge_the_cap_every_layer(layout: str) -> None:
    build, golden, n_patches = CAP_LAYOUTS[layout]
    family, model = build()
    protected = PROTECTED[family]
    zero_position_embedding(model)
    size = image_size(model)
    x = torch.tensor([0.2, -0.4, 0.7])[None, :, None, None].expand(1, 3, size, size).contiguous()
    depth = len(dymu_viz.patch(model).dymu.adapter.blocks)
    expected = (golden + [golden[-1]] * (depth + 1))[: depth + 1]
    assert expected == token_counts(n_patches + protected, [10**6] * depth, protected)  # the golden list is the cap

    unmerged = dymu_viz.encode(model, x)  # merging off: the common patch token
    model.dymu.thresholds = 0.99
    result = dymu_viz.encode(model, x)
    assert result.counts[0].tolist() == expected

    final_sizes = result.sizes[0].tolist()
    assert final_sizes == [1.0] * protected + [float(n_patches)]
    # every patch ended up in the single patch token; the CLS token stayed alone in row 0
    assert (result.groups[0, protected:] == protected).all()
    assert (result.groups[0, :protected] == 0).all()

    common = unmerged.tokens[0, protected:]
    torch.testing.assert_close(common, common[:1].expand_as(common), atol=1e-5, rtol=1e-5)
    # proportional attention over one token of size n equals attention over n equal tokens
    torch.testing.assert_close(result.tokens[0, protected], common[0], atol=1e-4, rtol=1e-4)
    if protected:
        torch.testing.assert_close(result.tokens[0, 0], unmerged.tokens[0, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.pooled, unmerged.pooled, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Determinism and dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_mode_is_deterministic(family: str) -> None:
    model = FACTORIES[family]()
    x = redundancy_images(image_size(model), patch_size(model))
    dymu_viz.patch(model, thresholds=0.5)
    first = dymu_viz.encode(model, x, output_hidden_states=True)
    second = dymu_viz.encode(model, x, output_hidden_states=True)
    assert (first.counts[:, -1] < n_tokens(family, model)).any()  # the run does merge
    assert_same_result(first, second)
    assert len(first.hidden_states) == len(second.hidden_states)
    for a, b in zip(first.hidden_states, second.hidden_states):
        assert torch.equal(a, b)
    out1 = flatten_outputs(family_outputs(family, model, x))
    out2 = flatten_outputs(family_outputs(family, model, x))
    for name in out1:
        assert torch.equal(out1[name], out2[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_mode_runs_in_low_and_high_precision(family: str, dtype: torch.dtype) -> None:
    model = FACTORIES[family]().to(dtype)
    x = redundancy_images(image_size(model), patch_size(model), dtype)
    dymu_viz.patch(model, thresholds=0.5)
    result = dymu_viz.encode(model, x)
    depth = model.dymu.depth
    n0 = n_tokens(family, model)
    assert result.tokens.dtype == dtype
    assert result.counts.shape == (4, depth + 1)
    assert (result.counts[:, 0] == n0).all()
    assert (result.counts[:, 1:] <= result.counts[:, :-1]).all()
    assert (result.counts[:, -1] < n0).any()  # something merged
    for b in range(4):
        n = int(result.counts[b, -1])
        assert torch.isfinite(result.tokens[b, :n]).all()
        assert result.sizes[b, :n].sum() == n0 and (result.sizes[b, :n] > 0).all()
        assert (result.sizes[b, n:] == 0).all()
    assert result.pooled is not None and torch.isfinite(result.pooled).all()
    assert result.pooled.shape[0] == 4
    out = flatten_outputs(family_outputs(family, model, x))
    for name, value in out.items():
        if name.startswith("last_hidden_state") or name.startswith("hidden_states") or name.startswith("tuple"):
            continue  # padded slots may hold anything
        assert torch.isfinite(value).all(), name


# ---------------------------------------------------------------------------------------------
# Size-aware pooling: a merged token of size s pools like s copies of itself
# ---------------------------------------------------------------------------------------------

def _timm_avg() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, class_token=True,
                             global_pool="avg", num_classes=0).eval()


def _open_clip_avg() -> nn.Module:
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=4,
                             output_dim=32, pool_type="avg").eval()


POOLERS = {
    "hf_siglip_map": lambda: make_hf_siglip(image=112, patch=14),
    "timm_map": lambda: make_timm_map(layers=4, image=64, patch=8),
    "timm_avg": _timm_avg,
    "open_clip_avg": _open_clip_avg,
}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(POOLERS))
def test_pooling_of_merged_tokens_equals_pooling_of_their_unmerged_copies(name: str, dtype, tol) -> None:
    """Proportional pooling (spec 2.7): the MAP head's log-size bias and the size-weighted mean
    make a token of size s count like s equal tokens, so pooling the merged sequence equals
    pooling the sequence expanded back to one copy per original token (with sizes 1)."""
    from dataclasses import replace
    model = POOLERS[name]().to(dtype)
    x = redundancy_images(image_size(model), patch_size(model), dtype)
    dymu_viz.patch(model, thresholds=0.5)
    result = dymu_viz.encode(model, x)
    assert result.sizes.max() > 2 and result.padding_mask.any()  # uneven sizes and padding
    expanded = replace(result, tokens=merge.unmerge(result.tokens, result.groups),
                       sizes=torch.ones_like(result.groups, dtype=result.sizes.dtype))
    pooled_expanded = model.dymu.adapter.pool(expanded)
    torch.testing.assert_close(result.pooled, pooled_expanded, atol=tol, rtol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_running_the_first_blocks_only_equals_those_layers_of_a_full_run(family: str) -> None:
    model = FACTORIES[family]()
    x = redundancy_images(image_size(model), patch_size(model))
    dymu_viz.patch(model, thresholds=0.5)
    full = dymu_viz.encode(model, x, output_hidden_states=True)
    depth = len(full.layer_sizes) - 1
    assert (full.counts[:, depth - 1] < n_tokens(family, model)).any()  # merged before the cut
    cut = dymu_viz.encode(model, x, output_hidden_states=True, blocks=depth - 1)
    assert cut.pooled is None and len(cut.hidden_states) == depth
    for layer in range(depth):
        assert torch.equal(cut.hidden_states[layer], full.hidden_states[layer])
        assert torch.equal(cut.layer_sizes[layer], full.layer_sizes[layer])
        assert torch.equal(cut.layer_groups[layer], full.layer_groups[layer])
    assert torch.equal(cut.counts, full.counts[:, :depth])
    with pytest.raises(ValueError, match="cannot run"):
        dymu_viz.encode(model, x, blocks=depth + 1)
