"""Property-based tests (hypothesis) of the merge invariants, the merging loop, VTU and the
threshold files (peers.md section 10, Tests 1-4; dymu-spec.md sections 2.3-2.6, 3.3 and 5).

Random token sets, sizes, thresholds, padding and batch compositions, all in float64. Every
expectation is computed without the code under test: a per-image reference of the matching
rule (the edges strictly above tau, best first, ties by slot, at most floor((n - protected) / 2))
and of the reference's token order, member counts and means over the original tokens, the
vanilla attention of the duplicated sequence, the values a file holds. The examples are the
same on every run: conftest.py loads the "ci" profile (derandomized, no example database).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import assume, given, note, settings, strategies as st
from torch import Tensor, nn

import dymu_viz
from dymu_viz import Thresholds, merge
from dymu_viz.encoder import EncoderResult, MergeConfig, run_blocks
from dymu_viz.thresholds import FORMAT, ThresholdsFileRefused
from dymu_viz.vtu import CACHE_POLICIES, VirtualLayout, patch_llm, unpatch_llm
from tiny_models import FACTORIES

F64 = torch.float64
SEEDS = st.integers(0, 2**32 - 1)
# thresholds: anywhere in the cosine range, the extremes, and exact values scores can take
TAUS = st.one_of(st.floats(-1.0, 1.0), st.sampled_from([-math.inf, math.inf, -1.0, 0.0, 1.0]))
KINDS = ("normal", "lattice", "clusters")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread for this module's tiny tensors (on a busy 2-core machine a second
    thread spinning for its share costs up to 100x the work); the count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(kind: str, shape: tuple[int, ...], seed: int) -> Tensor:
    """Random float64 features (..., N, C): "normal" (no ties), "lattice" (entries in {-1, 0, 1}:
    exact duplicates, zero vectors, tied scores) or "clusters" (three prototypes plus 1e-3
    noise: the high similarities of redundant images)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g, dtype=F64)
    if kind == "lattice":
        return torch.randint(-1, 2, shape, generator=g).to(F64)
    prototypes = torch.randn((*shape[:-2], 3, shape[-1]), generator=g, dtype=F64)
    pick = torch.randint(0, 3, shape[:-1], generator=g)[..., None].expand(shape)
    return prototypes.gather(-2, pick) + 1e-3 * torch.randn(shape, generator=g, dtype=F64)


# ------------------------------------------------------------------------------------------
# the reference rule, one image at a time
# ------------------------------------------------------------------------------------------

def reference_sources(best: list[float], n: int, protected: int, tau: float | None = None,
                      r: int | None = None) -> list[int]:
    """A indices (slot // 2) one image of n valid tokens merges: its edges (A slots past the
    protected one, when a B token exists) by descending score, ties by slot; those strictly above
    tau (DToMe) or the first r (ToMe); at most floor((n - protected) / 2) of them."""
    edges = [a for a in range(len(best)) if protected <= 2 * a < n and n >= 2]
    ranked = sorted(edges, key=lambda a: (-best[a], a))
    chosen = [a for a in ranked if best[a] > tau] if tau is not None else ranked[:max(r, 0)]
    return chosen[:max(n - protected, 0) // 2]


def reference_order(best: list[float], n: int, protected: int, sources: list[int]) -> list[int]:
    """Old slot of every new row (spec 2.6): an image that merges becomes [protected, unmerged A
    (by slot with a CLS token, else by descending score, ties by slot), B by slot]; one that
    merges nothing keeps its rows."""
    if not sources:
        return list(range(n))
    kept = [s for s in range(0, n, 2) if s // 2 not in sources]
    if not protected:
        kept.sort(key=lambda s: (-best[s // 2], s))
    return kept + list(range(1, n, 2))


def check_step(before: Tensor, after: Tensor, n0: int, n: int, width: int, best: Tensor, dst: Tensor,
               sources: list[int], protected: int) -> Tensor:
    """One image through one merging step against the reference. before, after: (N0,) row of
    every original token (the first n0 real, the rest padded originals); n: valid rows before;
    width: rows after, padding included; best, dst: (Na,) the step's edges; sources: the A
    indices the rule merges. Returns the new row of every old row, (n,)."""
    scores = best.tolist()
    assert [math.isfinite(s) for s in scores] == [protected <= 2 * a < n and n >= 2 for a in range(len(scores))]
    order = reference_order(scores, n, protected, sources)
    row = torch.full((n,), -1)
    row[before[:n0]] = after[:n0]
    assert torch.equal(row[before[:n0]], after[:n0]), "an old row was split"
    assert torch.equal(row[torch.tensor(order, dtype=torch.long)], torch.arange(len(order))), (order, row)
    for a in sources:  # a source joins the row of its best B partner
        partner = 2 * int(dst[a]) + 1
        assert partner < n and row[2 * a] == row[partner]
    assert bool((after[n0:] == width).all()), "a padded original left the padding row"
    return row


# ------------------------------------------------------------------------------------------
# one merging step: pure functions on random states
# ------------------------------------------------------------------------------------------

@st.composite
def merge_states(draw: st.DrawFn) -> dict[str, Any]:
    """A batch in the middle of merging: 1-4 images of 1-40 valid rows (a prefix, padded after),
    each row the mean of its 1+ original tokens (CLS alone in row 0 when protected), images
    with fewer originals padded with group N; junk features and metrics on padding rows.
    x0: (B, N0, C) originals; x, metric: (B, N, C); size: (B, N); groups: (B, N0). The batch is
    at least 2 rows wide, as the merging loop only runs a step on such batches (merge_tokens
    assumes a B side)."""
    protected = draw(st.integers(0, 1))
    n_valid = draw(st.lists(st.integers(max(protected, 1), 40), min_size=1, max_size=4).filter(lambda ns: max(ns) >= 2))
    extra = draw(st.lists(st.integers(0, 8), min_size=len(n_valid), max_size=len(n_valid)))
    C, kind, seed = draw(st.integers(1, 16)), draw(st.sampled_from(KINDS)), draw(SEEDS)
    g = torch.Generator().manual_seed(seed)
    B, N = len(n_valid), max(n_valid)
    n0 = [n + (e if n > protected else 0) for n, e in zip(n_valid, extra)]  # a lone CLS row has one member
    groups = torch.full((B, max(n0)), N)
    for b, (n, m) in enumerate(zip(n_valid, n0)):
        free = protected + torch.randperm(m - protected, generator=g)
        rows = torch.cat([torch.arange(n), torch.randint(protected, max(n, protected + 1), (m - n,), generator=g)])
        groups[b, :protected] = torch.arange(protected)
        groups[b, free] = rows[protected:]
    x0 = features(kind, (B, max(n0), C), seed + 1)
    member = merge.membership(groups, N + 1)[:, :N].to(F64)  # (B, N, N0); padded originals dropped
    size = member.sum(-1)
    x = (member @ x0) / size.clamp_min(1)[..., None]
    metric = features(kind, (B, N, C), seed + 2)
    padding = size == 0
    x[padding] = 1e3
    first_a = metric[:, [min(2 * protected, N - 1)]].expand(B, N, C)
    metric[padding] = first_a[padding]  # a perfect partner of an A token, were padding not masked
    return dict(x0=x0, x=x, size=size, groups=groups, metric=metric, n0=n0, protected=protected)


@settings(max_examples=250)
@given(state=merge_states(), data=st.data())
def test_a_merging_step_keeps_mass_partition_and_means_in_the_reference_order(state, data):
    """One bipartite step (DToMe with any tau, ties included, or ToMe with any r): every
    original token is in exactly one row, sizes are member counts summing to the input count,
    every row is the mean of its original members, i.e. the size-weighted mean of the rows
    merged into it (fp64, 1e-12), and rows that gain nothing are bitwise unchanged; the rule's
    edges merge, each into its best cosine partner, in the reference order."""
    x0, x, size, groups, protected = state["x0"], state["x"], state["size"], state["groups"], state["protected"]
    best, dst = merge.bipartite_scores(state["metric"], size, protected)
    finite = best[torch.isfinite(best)].tolist()
    rule = data.draw(st.sampled_from(["threshold", "fixed_r"]), label="rule")
    if rule == "threshold":
        tau = data.draw(TAUS | st.sampled_from(finite) if finite else TAUS, label="tau")  # on an edge: a tie
        src = merge.select_threshold(best, size, tau, protected)
    else:
        r = data.draw(st.integers(-1, 25), label="r")
        src = merge.select_fixed_r(best, size, r, protected)
    new_x, new_size, new_groups = merge.merge_tokens(x, size, groups, src, dst, best, protected)
    width = new_size.shape[1]
    for b, n0 in enumerate(state["n0"]):
        n = int((size[b] > 0).sum())
        scores = best[b].tolist()
        sources = reference_sources(scores, n, protected, tau) if rule == "threshold" else \
            reference_sources(scores, n, protected, r=r)
        assert src[b].nonzero().flatten().tolist() == sorted(sources)
        # cosine partners: the best score is the largest cosine with a valid B token, dst attains it
        if sources:
            unit = state["metric"][b, :n] / state["metric"][b, :n].norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cosine = unit[::2] @ unit[1::2].T
            a = torch.tensor(sources)
            assert torch.allclose(best[b, a], cosine[a].amax(-1), atol=1e-12, rtol=0)
            assert torch.allclose(best[b, a], cosine[a, dst[b, a]], atol=1e-12, rtol=0)
        row = check_step(groups[b], new_groups[b], n0, n, width, best[b], dst[b], sources, protected)
        kept = n - len(sources)
        members = merge.membership(new_groups[b:b + 1, :n0], width)[0].to(F64)  # (width, n0)
        assert torch.equal(new_size[b], members.sum(-1)) and float(new_size[b].sum()) == n0
        assert bool((new_size[b, :kept] > 0).all()) and not new_size[b, kept:].any()
        expected = members[:kept] @ x0[b, :n0] / new_size[b, :kept, None]
        assert torch.allclose(new_x[b, :kept], expected, atol=1e-12, rtol=0)
        alone = torch.bincount(row, minlength=kept) == 1  # new rows made of one old row
        old = torch.empty(kept, dtype=torch.long).scatter_(0, row, torch.arange(n))
        assert torch.equal(new_x[b, :kept][alone], x[b, old[alone]])


@settings(max_examples=150)
@given(state=merge_states(), taus=st.lists(TAUS, min_size=2, max_size=2))
def test_raising_tau_never_lowers_the_count_of_one_merging_step(state, taus):
    """On the same input, a higher tau merges a subset of the edges a lower one merges, so every
    image keeps at least as many tokens. (A true invariant of one step only: across layers a
    different count changes the next layer's input, so later counts may go either way; see
    test_raising_one_layers_tau_never_lowers_that_layers_count.)"""
    low, high = sorted(taus)
    size, protected = state["size"], state["protected"]
    best, dst = merge.bipartite_scores(state["metric"], size, protected)
    src_low = merge.select_threshold(best, size, low, protected)
    src_high = merge.select_threshold(best, size, high, protected)
    assert not (src_high & ~src_low).any()
    counts = [merge.merge_tokens(state["x"], size, state["groups"], src, dst, best, protected)[1].gt(0).sum(-1)
              for src in (src_low, src_high)]
    assert bool((counts[1] >= counts[0]).all())
    assert torch.equal(counts[0], (size > 0).sum(-1) - src_low.sum(-1))


# ------------------------------------------------------------------------------------------
# the merging loop: run_blocks on random tokens with a tiny model's blocks, encode on pixels
# ------------------------------------------------------------------------------------------

LAYERS, WIDTH = 4, 32
GEOMETRY = {"hf_clip": (84, 14), "hf_siglip": (84, 14), "open_clip": (48, 8), "timm_map": (48, 8),
            "timm_cls": (48, 8)}  # 36 patches each


@pytest.fixture(scope="module")
def encoders() -> dict[str, nn.Module]:
    """Every tiny family: 4 blocks of width 32, 36 patches (+ CLS), float64, patched (DToMe;
    each example sets its thresholds)."""
    return {family: dymu_viz.patch(FACTORIES[family](layers=LAYERS, hidden=WIDTH, heads=2, image=image, patch=patch)
                                   .to(F64), thresholds=math.inf)
            for family, (image, patch) in GEOMETRY.items()}


@contextlib.contextmanager
def recorded_edges() -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Records (best, dst) of every merge.bipartite_scores call the loop makes (a spy: it
    returns what the function returns)."""
    calls: list[tuple[Tensor, Tensor]] = []
    original = merge.bipartite_scores

    def spy(*args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        best, dst = original(*args, **kwargs)
        calls.append((best.clone(), dst.clone()))
        return best, dst

    merge.bipartite_scores = spy
    try:
        yield calls
    finally:
        merge.bipartite_scores = original


@st.composite
def token_batches(draw: st.DrawFn) -> tuple[Tensor, int]:
    """(B, N0, 32) embedded tokens: 1-4 images of 1-40 tokens, each of its own kind, and the
    protected count (1: a CLS token, 0: none)."""
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    n0, seed = draw(st.integers(1, 40)), draw(SEEDS)
    return torch.stack([features(kind, (n0, WIDTH), seed + i) for i, kind in enumerate(kinds)]), draw(st.integers(0, 1))


def run_loop(model: nn.Module, x: Tensor, protected: int, config: MergeConfig) -> EncoderResult:
    """The merging loop on embedded tokens x (B, N0, C) with model's blocks (no grad)."""
    with torch.no_grad():
        return run_blocks(x, model.dymu.adapter.blocks, config, protected, (1, x.shape[1] - protected),
                          output_hidden_states=True)


def merging_layers(result: EncoderResult, protected: int) -> list[int]:
    """The layers whose (padded) input can still merge, where the loop scores edges."""
    return [i for i in range(LAYERS) if int(result.counts[:, i].max()) - protected >= 2]


def check_run(result: EncoderResult, calls: list[tuple[Tensor, Tensor]], taus: list[float], protected: int) -> None:
    """Every layer of every image against the reference rule and order (``check_step``); sizes
    are member counts on a valid prefix; a layer that scores no edge keeps its rows."""
    n0 = result.groups.shape[1]
    layers = merging_layers(result, protected)
    assert len(calls) == len(layers)
    edges = dict(zip(layers, calls))
    for i in range(LAYERS):
        before, after, sizes = result.layer_groups[i], result.layer_groups[i + 1], result.layer_sizes[i + 1]
        for b in range(result.counts.shape[0]):
            n, kept = int(result.counts[b, i]), int(result.counts[b, i + 1])
            assert torch.equal(sizes[b], torch.bincount(after[b], minlength=sizes.shape[1]).to(sizes.dtype))
            assert bool((sizes[b, :kept] > 0).all()) and not sizes[b, kept:].any()
            if i in edges:
                best, dst = edges[i][0][b], edges[i][1][b]
                sources = reference_sources(best.tolist(), n, protected, taus[i])
                assert n - kept == len(sources) <= (n - protected) // 2
                check_step(before[b], after[b], n0, n, sizes.shape[1], best, dst, sources, protected)
            else:
                assert kept == n and torch.equal(after[b], before[b])


@settings(max_examples=150)
@given(family=st.sampled_from(sorted(GEOMETRY)), batch=token_batches(),
       taus=st.lists(TAUS, min_size=LAYERS, max_size=LAYERS), data=st.data())
def test_every_merging_layer_follows_the_rule_and_the_reference_order(encoders, family, batch, taus, data):
    """Inside the loop, after every layer, with and without CLS: exactly the edges strictly
    above the layer's tau merge (best first, at most floor((n - protected) / 2)), each into its
    best partner, and the rows follow the reference order. About half the examples move one
    layer's tau onto one of its own edge scores and run again (the layers before it are
    unchanged, so that edge is there again): an exact tie, which must not merge."""
    x, protected = batch
    model = encoders[family]
    with recorded_edges() as calls:
        result = run_loop(model, x, protected, MergeConfig("threshold", taus))
    ties = [(i, score) for i, (best, _) in zip(merging_layers(result, protected), calls)
            for score in best[torch.isfinite(best)].unique().tolist()]
    if ties and data.draw(st.booleans(), label="tau on an edge score"):
        layer, tau = data.draw(st.sampled_from(ties), label="layer, tau")
        taus = taus[:layer] + [tau] + taus[layer + 1:]
        with recorded_edges() as calls:
            result = run_loop(model, x, protected, MergeConfig("threshold", taus))
        assert bool((calls[merging_layers(result, protected).index(layer)][0] == tau).any())
    check_run(result, calls, taus, protected)


@settings(max_examples=60)
@given(family=st.sampled_from(sorted(GEOMETRY)), batch=token_batches(),
       taus=st.lists(TAUS, min_size=LAYERS, max_size=LAYERS), layer=st.integers(0, LAYERS - 1),
       raise_by=st.floats(0.0, 2.0) | st.just(math.inf))
def test_raising_one_layers_tau_never_lowers_that_layers_count(encoders, family, batch, taus, layer, raise_by):
    """Raising tau_i alone: the layers before i are untouched, so layer i sees the same input
    and merges a subset of its edges; its count cannot drop. (The later layers see other input:
    their counts are not constrained, and are not checked.)"""
    x, protected = batch
    low = run_loop(encoders[family], x, protected, MergeConfig("threshold", taus))
    raised = taus[:layer] + [math.inf if raise_by == math.inf else taus[layer] + raise_by] + taus[layer + 1:]
    high = run_loop(encoders[family], x, protected, MergeConfig("threshold", raised))
    assert torch.equal(high.counts[:, :layer + 1], low.counts[:, :layer + 1])
    assert all(torch.equal(a, b) for a, b in zip(high.layer_groups[:layer + 1], low.layer_groups[:layer + 1]))
    assert bool((high.counts[:, layer + 1] >= low.counts[:, layer + 1]).all())


@settings(max_examples=40)
@given(family=st.sampled_from(sorted(GEOMETRY)), batch=token_batches())
def test_infinite_tau_is_the_identity(encoders, family, batch):
    """tau = +inf in every layer merges nothing and changes nothing: the loop's outputs equal
    those of merging off, bitwise."""
    x, protected = batch
    inf = run_loop(encoders[family], x, protected, MergeConfig("threshold", [math.inf] * LAYERS))
    off = run_loop(encoders[family], x, protected, MergeConfig("off"))
    assert bool((inf.counts == x.shape[1]).all())
    assert torch.equal(inf.groups, torch.arange(x.shape[1]).expand_as(inf.groups))
    assert all(torch.equal(a, b) for a, b in zip(inf.hidden_states, off.hidden_states))
    assert torch.equal(inf.tokens, off.tokens) and torch.equal(inf.sizes, off.sizes)


@st.composite
def images(draw: st.DrawFn, size: int) -> Tensor:
    """(3, size, size) float64 pixels: noise, smooth (upsampled 2-6 px noise: redundant
    patches), one colour, or half one colour and half noise."""
    kind, seed = draw(st.sampled_from(["noise", "smooth", "constant", "half"])), draw(SEEDS)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(3, size, size, generator=g, dtype=F64)
    if kind == "noise":
        return noise
    low = draw(st.integers(2, 6))
    smooth = torch.nn.functional.interpolate(torch.randn(1, 3, low, low, generator=g, dtype=F64), size=size)[0]
    if kind == "smooth":
        return smooth
    colour = smooth[:, :1, :1].expand(3, size, size).clone()
    if kind == "half":
        colour[:, size // 2:] = noise[:, size // 2:]
    return colour


@settings(max_examples=80)
@given(family=st.sampled_from(sorted(GEOMETRY)),
       taus=st.lists(st.floats(0.3, 1.0) | st.just(math.inf), min_size=LAYERS, max_size=LAYERS), data=st.data())
def test_an_image_alone_equals_the_image_inside_a_padded_batch(encoders, family, taus, data):
    """Batch invariance away from ties (fp64): each image of a batch of 2-4 (their own counts:
    the batch is padded) gives the counts, sizes and groups of every layer it gives alone,
    padding of size 0 after them, and its hidden states, output tokens and pooled output
    (1e-12). Examples with an edge score within 1e-9 of a threshold are skipped."""
    model = encoders[family]
    pixels = torch.stack(data.draw(st.lists(images(GEOMETRY[family][0]), min_size=2, max_size=4), label="images"))
    model.dymu.thresholds = taus
    with torch.no_grad():
        alone = [dymu_viz.encode(model, pixels[j:j + 1], output_hidden_states=True) for j in range(len(pixels))]
        assume(all(float(result.margins.min()) > 1e-9 for result in alone))
        batch = dymu_viz.encode(model, pixels, output_hidden_states=True)
    note(f"counts {batch.counts.tolist()}")
    tol = dict(atol=1e-12, rtol=1e-12)
    for j, one in enumerate(alone):
        assert torch.equal(batch.counts[j], one.counts[0])
        for layer, n in enumerate(one.counts[0].tolist()):
            assert torch.equal(batch.layer_groups[layer][j], one.layer_groups[layer][0])
            assert torch.equal(batch.layer_sizes[layer][j, :n], one.layer_sizes[layer][0])
            assert not batch.layer_sizes[layer][j, n:].any()
            torch.testing.assert_close(batch.hidden_states[layer][j, :n], one.hidden_states[layer][0], **tol)
        torch.testing.assert_close(batch.image_tokens(j), one.image_tokens(0), **tol)
        torch.testing.assert_close(batch.pooled[j], one.pooled[0], **tol)


# ------------------------------------------------------------------------------------------
# VTU on a tiny float64 Llama
# ------------------------------------------------------------------------------------------

VOCAB, HIDDEN, HEAD_DIM = 128, 64, 16


@pytest.fixture(scope="module")
def llamas() -> Iterator[tuple[nn.Module, nn.Module]]:
    """(vanilla, VTU-patched) copies of one tiny random float64 Llama (2 layers, 4 query and 2
    key / value heads of dim 16). The patch is undone at the end: while a patched decoder
    lives, its modeling module's apply_rotary_pos_emb stays hooked."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=VOCAB, attn_implementation="sdpa")
    vanilla = LlamaForCausalLM(config).to(F64).eval()
    patched = copy.deepcopy(vanilla)
    patch_llm(patched)
    yield vanilla, patched
    unpatch_llm(patched)


@st.composite
def virtual_mappings(draw: st.DrawFn) -> list[int]:
    """One prompt's virtual position -> compact token: leading text, then up to 3 parts: text,
    an empty image, an image of single-token groups, one whole-image group, or a random
    grouping (every compact token covers 1+ positions, in any order)."""
    mapping = list(range(draw(st.integers(1, 4))))
    for _ in range(draw(st.integers(0, 3))):
        kind, n = draw(st.sampled_from(["text", "empty", "single", "whole", "random"])), draw(st.integers(1, 10))
        if kind in ("text", "single"):
            local = list(range(n))
        elif kind == "empty":
            local = []
        elif kind == "whole":
            local = [0] * n
        else:
            c = draw(st.integers(1, n))
            local = draw(st.permutations(list(range(c)) + draw(st.lists(st.integers(0, c - 1), min_size=n - c,
                                                                          max_size=n - c))))
        mapping += [max(mapping) + 1 + i for i in local]
    return mapping


def padded_layout(mappings: list[list[int]], width: int) -> VirtualLayout:
    """The layout of left-padded compact rows of ``width`` tokens."""
    return VirtualLayout.from_mappings([torch.tensor(m) + width - (max(m) + 1) for m in mappings])


def vanilla_scatter_mean(model: nn.Module, layer: int, h: Tensor, mapping: list[int]) -> Tensor:
    """Vanilla causal attention of layer on the duplicated sequence h[mapping] (RoPE at
    positions 0..V-1), averaged over the copies of each compact token: (P, C) for h (P, C)."""
    index = torch.tensor(mapping)
    expanded = h[index][None]
    cos, sin = model.model.rotary_emb(expanded, torch.arange(len(mapping))[None])
    causal = torch.ones(len(mapping), len(mapping), dtype=torch.bool).tril()
    mask = torch.zeros(causal.shape, dtype=F64).masked_fill(~causal, torch.finfo(F64).min)
    attention = model.model.layers[layer].self_attn
    out, _ = attention(expanded, position_embeddings=(cos, sin), attention_mask=mask[None, None])
    summed = torch.zeros_like(h).index_add_(0, index, out[0])
    return summed / torch.bincount(index, minlength=len(h)).to(F64)[:, None]


@settings(max_examples=150)
@given(mappings=st.lists(virtual_mappings(), min_size=1, max_size=3), kernel=st.sampled_from(["sdpa", "exact"]),
       layer=st.integers(0, 1), seed=SEEDS)
def test_vtu_attention_is_the_scatter_mean_of_vanilla_attention_over_the_copies(llamas, mappings, kernel, layer, seed):
    """One attention layer on a left-padded batch of compact rows: each row's output is the
    mean, over its virtual copies, of vanilla attention on the duplicated sequence (fp64,
    1e-12). Kernels "sdpa" and "exact"; "eager" softmaxes in float32 by design (HF's eager
    semantics), so it is not an fp64 identity."""
    vanilla, patched = llamas
    width = max(max(m) + 1 for m in mappings)
    h = torch.randn(len(mappings), width, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=F64)
    with torch.no_grad():
        expected = [vanilla_scatter_mean(vanilla, layer, h[b, width - max(m) - 1:], m) for b, m in enumerate(mappings)]
        state = patch_llm(patched, kernel, cache="compact")  # the layer alone: its own identity RoPE, no hook
        state.start(padded_layout(mappings, width), width)
        ones = torch.ones(1, width, HEAD_DIM, dtype=F64)
        out, _ = patched.model.layers[layer].self_attn(h, position_embeddings=(ones, torch.zeros_like(ones)),
                                                       attention_mask=None)
    for b, m in enumerate(mappings):
        torch.testing.assert_close(out[b, width - max(m) - 1:], expected[b], atol=1e-12, rtol=0)


@settings(max_examples=40)
@given(mappings=st.lists(virtual_mappings(), min_size=1, max_size=3), kernel=st.sampled_from(["sdpa", "exact"]),
       policy=st.sampled_from(CACHE_POLICIES), steps=st.integers(1, 4), seed=SEEDS)
def test_vtu_cached_decoding_equals_recomputation(llamas, mappings, kernel, policy, steps, seed):
    """A left-padded prompt batch, then greedy decode steps with the KV cache: the logits of
    every step equal those of the whole sequence recomputed without a cache, the new tokens
    one slot each after the prompt's virtual positions (fp64, 1e-12)."""
    _, model = llamas
    B, width = len(mappings), max(max(m) + 1 for m in mappings)
    ids = torch.randint(0, VOCAB, (B, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, m in enumerate(mappings):
        mask[b, width - max(m) - 1:] = 1
    state = patch_llm(model, kernel, cache=policy)
    layout = padded_layout(mappings, width)
    with torch.no_grad():
        state.start(layout, width)
        out = model(input_ids=ids, attention_mask=mask)
        logits, tokens = [out.logits[:, -1]], []
        for t in range(steps):
            tokens.append(logits[-1].argmax(-1)[:, None])
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
            out = model(input_ids=tokens[-1], attention_mask=mask, past_key_values=out.past_key_values)
            logits.append(out.logits[:, -1])
        lengths = torch.tensor([len(m) for m in mappings])  # each row's virtual positions: 0..len - 1
        for t in range(steps + 1):
            new = torch.arange(width, width + t).expand(B, t)
            state.start(layout.append(VirtualLayout(new, lengths[:, None] + torch.arange(t), new >= 0)), width + t)
            sequence = torch.cat([ids, *tokens[:t]], 1)
            again = model(input_ids=sequence, attention_mask=mask[:, :width + t], use_cache=False).logits[:, -1]
            torch.testing.assert_close(again, logits[t], atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------
# threshold files
# ------------------------------------------------------------------------------------------

NAMED_ERRORS = (ValueError, TypeError)  # what Thresholds.load raises for a file it refuses
TEXT = st.text(alphabet="ab-_./0123456789 \u00e9\u2603\"\\\n", max_size=12)
JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
REFERENCE_PREFIXES = ("visual.transformer.resblocks", "visual.trunk.blocks", "vision_model.encoder.layers")


@st.composite
def thresholds(draw: st.DrawFn) -> Thresholds:
    """Any valid Thresholds: 0-6 layers of any non-NaN value (inf, subnormal, -0.0), any ints,
    texts and JSON metadata."""
    layers = draw(st.integers(0, 6))
    return Thresholds(draw(st.lists(st.floats(allow_nan=False), min_size=layers, max_size=layers)),
                      draw(st.lists(st.integers(), min_size=layers, max_size=layers)), model=draw(TEXT),
                      schedule=draw(st.sampled_from(["constant", "linear", "reverse_linear"]) | TEXT),
                      r_total=draw(st.none() | st.integers()), metadata=draw(st.dictionaries(TEXT, JSON, max_size=3)))


def same_thresholds(a: Thresholds, b: Thresholds) -> bool:
    """Every field equal, floats bit for bit (the sign of zero included)."""
    return [v.hex() for v in a.values] == [v.hex() for v in b.values] and \
        (a.r, a.model, a.schedule, a.r_total, a.metadata) == (b.r, b.model, b.schedule, b.r_total, b.metadata)


@settings(max_examples=100)
@given(saved=thresholds())
def test_a_saved_thresholds_file_loads_to_the_same_thresholds(saved):
    """save then load: every field as it was (JSON keeps floats exactly, inf included)."""
    with tempfile.TemporaryDirectory() as tmp:
        assert same_thresholds(Thresholds.load(saved.save(Path(tmp, "t.json"))), saved)


@st.composite
def threshold_documents(draw: st.DrawFn, typed: bool) -> str:
    """What a thresholds JSON file may hold: a saved file with fields dropped or replaced by any
    JSON value (NaN included), a list entry replaced or added, or cut short; untyped: also any
    JSON document. typed: the document stays an object whose "values" / "r" (where present)
    are lists of numbers / integers (of at most 53 bits in "values": exact as floats)."""
    doc = draw(thresholds()).to_dict()
    how = draw(st.sampled_from(["fields", "entry", "cut"] if typed else ["fields", "entry", "cut", "any"]))
    if how == "any":
        return json.dumps(draw(JSON | st.floats()))
    numbers = {"values": st.floats() | st.integers(-2**53, 2**53), "r": st.integers()}
    if how == "fields":
        for key in draw(st.lists(st.sampled_from(sorted(doc)), unique=True, min_size=1, max_size=3)):
            if draw(st.booleans()):
                del doc[key]
            else:
                doc[key] = draw(st.lists(numbers[key]) if typed and key in numbers else JSON | st.floats())
    if how == "entry":
        key = draw(st.sampled_from(sorted(numbers)))
        entry = draw(numbers[key] if typed else JSON_SCALARS | st.floats())
        doc[key] = [entry] + doc[key][1:] if doc[key] and draw(st.booleans()) else doc[key] + [entry]
    text = json.dumps(doc)
    return text[:draw(st.integers(0, len(text)))] if how == "cut" else text


def is_number(v: Any, integer: bool = False) -> bool:
    """A JSON number (an integer when asked), not a boolean."""
    return isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "any"])
@settings(max_examples=100)
@given(data=st.data())
def test_a_thresholds_json_file_loads_what_it_holds_or_fails_with_a_named_error(typed, data):
    """Whatever a .json file holds, Thresholds.load either returns exactly its values (numbers),
    schedule (integers) and other fields, or raises ValueError / TypeError. "typed": files whose
    lists hold numbers (the property holds); "any": every file (it does not, see the mark)."""
    text = data.draw(threshold_documents(typed), label="text")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "t.json")
        path.write_text(text)
        try:
            loaded = Thresholds.load(path)
        except NAMED_ERRORS:
            return
    doc = json.loads(text)
    assert isinstance(doc, dict) and doc["format"] == FORMAT
    assert isinstance(doc["values"], list) and all(is_number(v) for v in doc["values"])
    assert isinstance(doc["r"], list) and all(is_number(v, integer=True) for v in doc["r"])
    assert loaded.values == doc["values"] and loaded.r == doc["r"]
    defaults = dict(model="", schedule="constant", r_total=None, metadata={})
    assert all(getattr(loaded, key) == doc.get(key, default) for key, default in defaults.items())


@settings(max_examples=50)
@given(saved=thresholds(), prefix=st.sampled_from(REFERENCE_PREFIXES), suffix=st.sampled_from([".pth", ".pt", ".bin"]))
def test_a_reference_checkpoint_written_by_thresholds_loads_its_float32_values(saved, prefix, suffix):
    """save_reference_checkpoint stores float32 0-dim tensors (torch.tensor of a float): loading
    gives those float32 values exactly, in block order, and the name as the model; a file of
    zero layers holds no threshold and is refused (ValueError)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = saved.save_reference_checkpoint(Path(tmp, "t" + suffix), prefix)
        if not saved.layers:
            with pytest.raises(ValueError, match="threshold"):
                Thresholds.load(path)
            return
        try:
            loaded = Thresholds.load(path)
        except ValueError as err:  # the name decides the schedule: a "Kout" name may not fit
            assert "out" in saved.model, err
            return
    assert loaded.values == [float(torch.tensor(v, dtype=torch.float32)) for v in saved.values]
    assert loaded.model == saved.model and loaded.layers == saved.layers


@st.composite
def checkpoint_values(draw: st.DrawFn) -> tuple[Any, float | None]:
    """A state-dict value and the threshold it holds (None: not one number): 0-dim tensors of
    every float dtype and int64, Python numbers, tensors of 0, 1 or 3 elements."""
    v = draw(st.floats(width=32))
    kind = draw(st.sampled_from(["bfloat16", "float16", "float32", "float64", "int64", "python", "vector"]))
    if kind == "int64":
        i = draw(st.integers(-2**40, 2**40))
        return torch.tensor(i), float(i)
    if kind == "python":
        return v, (None if math.isnan(v) else v)
    if kind == "vector":
        n = draw(st.sampled_from([0, 1, 3]))
        t = torch.full((n,), v, dtype=torch.float32)
        return t, (float(t[0]) if n == 1 and not math.isnan(v) else None)
    t = torch.tensor(v, dtype=getattr(torch, kind))
    return t, (None if math.isnan(float(t)) else float(t))


def checkpoint_names(smallest_patch: int) -> st.SearchStrategy[Any]:
    """Checkpoint names: any text, None, an integer, or a reference-style name (its patch size
    and Kout decide the schedule) with patches of smallest_patch..40 pixels."""
    return st.one_of(TEXT, st.none(), st.integers(), st.builds(
        "ViT-{}-{}-{}-tome-{}out{}".format, st.sampled_from("BL"), st.integers(smallest_patch, 40),
        st.integers(100, 999), st.integers(0, 2000), st.sampled_from(["", "-linear", "-reverse_linear", "-no-merge"])))


NEAR_MISSES = ("module.visual.transformer.resblocks.0.threshold_count", "visual.trunk.blocks.x.threshold",
               "module.text.transformer.resblocks.0.threshold", "module.visual.trunk.blocks.0.attn.threshold",
               "module.module.vision_model.encoder.layers.0.threshold", "threshold")


@st.composite
def reference_checkpoints(draw: st.DrawFn, typed: bool) -> tuple[Any, list[float] | None]:
    """What a .pth may hold: threshold entries of one layout (with or without "module."), blocks
    0..n-1 or any others, any values, near-miss keys, in any order; wrapped as {"name",
    "state_dict"}, bare, or in a list; untyped: also a state_dict that is a list and names of
    0-pixel patches. Returns (object, the thresholds it holds by block, or None when it is not a
    threshold checkpoint)."""
    prefix = ("module." if draw(st.booleans()) else "") + draw(st.sampled_from(REFERENCE_PREFIXES))
    contiguous = st.integers(0, 5).map(lambda n: list(range(n)))
    blocks = draw(st.lists(st.integers(0, 6), unique=True, max_size=5) | contiguous)
    held = {b: draw(checkpoint_values()) for b in blocks}
    entries = [(f"{prefix}.{b}.threshold", value) for b, (value, _) in held.items()]
    entries += [(key, torch.ones(2)) for key in draw(st.lists(st.sampled_from(NEAR_MISSES), unique=True, max_size=3))]
    state = dict(draw(st.permutations(entries)))
    values = [held[b][1] for b in sorted(held)]
    valid = bool(blocks) and sorted(blocks) == list(range(len(blocks))) and None not in values
    name = draw(checkpoint_names(1 if typed else 0))
    wrapper = draw(st.sampled_from(["named", "bare", "list"] + ([] if typed else ["state_dict_list"])))
    if wrapper == "named":
        return {"name": name, "state_dict": state}, (values if valid else None)
    if wrapper == "bare":
        return state, (values if valid else None)
    if wrapper == "list":
        return [state], None
    return {"name": name, "state_dict": list(state.items())}, None


@pytest.mark.parametrize("typed", [True, False], ids=["typed", "any"])
@settings(max_examples=80)
@given(data=st.data(), suffix=st.sampled_from([".pth", ".pt", ".bin"]))
def test_a_pth_file_loads_what_it_holds_or_fails_with_a_named_error(typed, data, suffix):
    """Whatever a .pth holds, Thresholds.load either returns exactly the thresholds it holds
    (one number per block 0..n-1, the name as the model) or raises ValueError / TypeError; a
    well-formed checkpoint whose name asks for no "Kout" schedule always loads. "typed": dict
    state_dicts and patches of 1+ pixels (the property holds); "any": every file (see the mark)."""
    ckpt, expected = data.draw(reference_checkpoints(typed), label="checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "t" + suffix)
        torch.save(ckpt, path)
        try:
            loaded = Thresholds.load(path)
        except NAMED_ERRORS:
            name = ckpt.get("name", "") if isinstance(ckpt, dict) else ""
            assert expected is None or "out" in str(name), "a well-formed checkpoint was refused"
            return
    assert expected is not None, "a malformed checkpoint was accepted"
    assert loaded.values == expected and loaded.model == str(ckpt.get("name", ""))


class RunsCode:
    """Unpickling this object calls os.mkdir(path): a stand-in for a hostile checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocols other than 2
@settings(max_examples=30)
@given(where=st.sampled_from(["top", "name", "state_dict", "threshold"]), writer=st.sampled_from(["torch", "pickle"]),
       protocol=st.integers(2, 5), suffix=st.sampled_from([".pth", ".pt", ".bin"]))
def test_a_pth_that_would_run_code_is_refused_without_running_it(where, writer, protocol, suffix):
    """A .pth whose unpickling would call a function (here os.mkdir) anywhere in it is refused
    with ThresholdsFileRefused (an UnpicklingError and a ValueError, so the CLI reports it in one
    line) and runs nothing (weights_only); the same file loaded unsafely does run it, so the
    payload is live."""
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp, "ran")
        payload = RunsCode(str(marker))
        state = {"visual.trunk.blocks.0.threshold": torch.tensor(0.5)}
        ckpt = {"top": payload, "name": {"name": payload, "state_dict": state},
                "state_dict": {"name": "x", "state_dict": payload},
                "threshold": {"name": "x", "state_dict": {**state, "visual.trunk.blocks.1.threshold": payload}}}[where]
        path = Path(tmp, "hostile" + suffix)
        if writer == "torch":
            torch.save(ckpt, path, pickle_protocol=protocol)
        else:
            path.write_bytes(pickle.dumps(ckpt, protocol=protocol))
        with pytest.raises(ThresholdsFileRefused, match="would run code"):
            Thresholds.load(path)
        assert not marker.exists()
        with contextlib.suppress(Exception):
            torch.load(path, weights_only=False) if writer == "torch" else pickle.loads(path.read_bytes())
        assert marker.exists()
