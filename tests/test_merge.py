"""Properties of the pure merge functions (dymu-spec.md section 2; peers.md section 10,
Tests 1 and 2).

Expectations are derived independently: a naive per-image loop re-implementation of the
merge rule (spec 2.5 / module docstring: stable compaction, size-weighted averages), sorting
of edge scores, and the closed-form invariants (sizes, mass, membership).
"""

from __future__ import annotations

import math

import pytest
import torch

from dymu_viz import merge as M

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels

B, C = 3, 64
# (N, protected): CLIP-B/16-224 and CLIP-L/14-336 with CLS; SigLIP-B/16-224 and so400m without.
LAYOUTS = [(197, 1), (577, 1), (196, 0), (729, 0)]
LAYOUT_IDS = [f"N{n}-p{p}" for n, p in LAYOUTS]
F64 = torch.float64


def cap_of(n_valid: int, protected: int) -> int:
    return max(n_valid - protected, 0) // 2


def fresh(n: int, seed: int, dtype=F64):
    """Identity state: every token its own group, size 1."""
    torch.manual_seed(seed)
    x = torch.randn(B, n, C, dtype=dtype)
    k = torch.randn(B, n, C, dtype=dtype)
    size = torch.ones(B, n, dtype=dtype)
    groups = torch.arange(n).expand(B, n).clone()
    return x, k, size, groups


def padded_state(n: int, protected: int, n_valid: list[int], seed: int):
    """A batch whose row b has n_valid[b] valid tokens (a prefix) and size-0 padding after.

    Each row covers the same n original tokens: original token p lives in row groups[b, p];
    the assignment is random (every valid row gets >= 1 token, CLS stays alone in row 0), so
    sizes are > 1 and groups are not contiguous. Padding slots get junk features and metrics.
    """
    g = torch.Generator().manual_seed(seed)
    rows = len(n_valid)
    x = torch.randn(rows, n, C, dtype=F64, generator=g)
    k = torch.randn(rows, n, C, dtype=F64, generator=g)
    size = torch.zeros(rows, n, dtype=F64)
    groups = torch.empty(rows, n, dtype=torch.long)
    for b, nv in enumerate(n_valid):
        assert protected <= nv <= n
        free = torch.randperm(n - protected, generator=g) + protected  # non-CLS originals
        row_of = torch.empty(n, dtype=torch.long)
        row_of[:protected] = torch.arange(protected)
        n_free_rows = nv - protected
        row_of[free[:n_free_rows]] = torch.arange(protected, nv)
        row_of[free[n_free_rows:]] = torch.randint(protected, nv, (n - nv,), generator=g)
        groups[b] = row_of
        size[b, :nv] = torch.bincount(row_of, minlength=nv).to(F64)[:nv]
    return x, k, size, groups


def reference_merge_row(x, size, groups, src, dst, best, protected):
    """Naive single-image merge (no batch): x (N, C), size (N,), groups (N0,), src/dst/best (Na,).

    Survivors, when the image merges: [unmerged A slots (by slot with a protected CLS, else by
    descending score, ties by slot), then valid B slots]; with no merge the valid slots as they
    are. Every source joins the row of its B partner; features are size-weighted means.
    Returns (x', size', groups') trimmed to the surviving count.
    """
    n = size.shape[0]
    valid = [i for i in range(n) if size[i] > 0]
    sources = {2 * a: 2 * int(dst[a]) + 1 for a in range(src.shape[0]) if bool(src[a])}
    if sources:
        kept_a = [i for i in valid if i % 2 == 0 and i not in sources]
        if not protected:
            kept_a.sort(key=lambda i: (-float(best[i // 2]), i))
        survivors = kept_a + [i for i in valid if i % 2 == 1]
    else:
        survivors = valid
    new_row = {i: j for j, i in enumerate(survivors)}
    for s_slot, d_slot in sources.items():
        new_row[s_slot] = new_row[d_slot]
    rows = torch.tensor([new_row[i] for i in valid], dtype=torch.long)
    idx = torch.tensor(valid, dtype=torch.long)
    out_size = torch.zeros(len(survivors), dtype=size.dtype).index_add_(0, rows, size[idx])
    out_x = torch.zeros(len(survivors), x.shape[-1], dtype=x.dtype)
    out_x.index_add_(0, rows, size[idx, None] * x[idx])
    out_x = out_x / out_size[:, None]
    out_groups = torch.tensor([new_row[r] for r in groups.tolist()])
    return out_x, out_size, out_groups


def n_valid_rows(size):
    return (size > 0).sum(-1)


def select(rule: str, best, size, protected, arg):
    if rule == "fixed":
        return M.select_fixed_r(best, size, arg, protected)
    if rule == "threshold":
        return M.select_threshold(best, size, arg, protected)
    src, _ = M.select_batch_top(best, size, arg, protected)
    return src


# ------------------------------------------------------------------------------------------
# bipartite_scores
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_scores_are_best_cosine_similarities(n, protected):
    _, k, size, _ = fresh(n, seed=1)
    best, dst = M.bipartite_scores(k, size, protected)
    na, nb = (n + 1) // 2, n // 2
    assert best.shape == (B, na) and dst.shape == (B, na)
    # independent cosine matrix: A = even slots, B = odd slots
    unit = k / k.pow(2).sum(-1, keepdim=True).sqrt()
    cos = torch.einsum("bic,bjc->bij", unit[:, ::2], unit[:, 1::2])  # (B, Na, Nb)
    exp_best, exp_dst = cos.max(-1)
    if protected:
        assert torch.all(best[:, 0] == -math.inf)
    assert torch.allclose(best[:, protected:], exp_best[:, protected:], atol=1e-12, rtol=0)
    assert torch.equal(dst[:, protected:], exp_dst[:, protected:])
    finite = best[torch.isfinite(best)]
    assert finite.numel() == B * (na - protected)
    assert finite.min() >= -1 - 1e-12 and finite.max() <= 1 + 1e-12
    assert torch.all((dst >= 0) & (dst < nb))


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_scores_mask_padding_rows_and_columns(n, protected):
    n_valid = [n, n - 37, n - 100]
    _, k, size, _ = padded_state(n, protected, n_valid, seed=2)
    # Make every padded token a perfect copy of a valid A token's metric: if padding columns
    # were not masked, they would be the unique best partner (cosine 1).
    for b, nv in enumerate(n_valid):
        k[b, nv:] = k[b, protected * 2 if protected else 0]
    best, dst = M.bipartite_scores(k, size, protected)
    for b, nv in enumerate(n_valid):
        a_slots = torch.arange(best.shape[1]) * 2
        pad_a = a_slots >= nv
        assert torch.all(best[b, pad_a] == -math.inf)
        if protected:
            assert best[b, 0] == -math.inf
        live = ~pad_a
        live[:protected] = False
        assert torch.all(torch.isfinite(best[b, live]))
        # the chosen partner of every live A token is a valid B token
        assert torch.all(2 * dst[b, live] + 1 < nv)
        assert best[b, live].max() < 1 - 1e-9  # no cosine-1 padding partner leaked in


def test_bf16_metric_gives_float32_scores():
    torch.manual_seed(3)
    k = torch.randn(B, 197, C).to(torch.bfloat16)
    size = torch.ones(B, 197, dtype=torch.bfloat16)
    best, _ = M.bipartite_scores(k, size, 1)
    assert best.dtype == torch.float32
    assert M.score_dtype(torch.bfloat16) == torch.float32
    assert M.score_dtype(torch.float64) == torch.float64


# ------------------------------------------------------------------------------------------
# fixed r: counts, identity, CLS, conservation, reference comparison
# ------------------------------------------------------------------------------------------

def r_values(n, protected):
    cap = cap_of(n, protected)
    return [0, 1, 8, cap, cap + 5]


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_fixed_r_step_properties(n, protected):
    x, k, size, groups = fresh(n, seed=10 + n)
    best, dst = M.bipartite_scores(k, size, protected)
    cap = cap_of(n, protected)
    mass0 = (x * size[..., None]).sum(1)
    for r in r_values(n, protected):
        src = M.select_fixed_r(best, size, r, protected)
        nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
        n_out = n - min(r, cap)
        # length per row
        assert nx.shape == (B, n_out, C) and ns.shape == (B, n_out)
        assert torch.equal(n_valid_rows(ns), torch.full((B,), n_out))
        assert torch.equal(src.sum(-1), torch.full((B,), min(r, cap)))
        # sizes sum to N, mass conserved
        assert torch.equal(ns.sum(-1), torch.full((B,), float(n), dtype=F64))
        assert torch.allclose((nx * ns[..., None]).sum(1), mass0, atol=1e-10, rtol=0)
        # CLS: row 0 unchanged, alone in its group, never a source
        if protected:
            assert not src[:, 0].any()
            assert torch.equal(nx[:, 0], x[:, 0])
            assert ns[:, 0].eq(1).all()
            assert torch.equal((ng == 0).sum(-1), torch.ones(B, dtype=torch.long))
            assert ng[:, 0].eq(0).all()
        # groups index valid rows only
        assert ng.min() >= 0 and ng.max() < n_out
        # matches the naive reference row by row
        for b in range(B):
            ex, es, eg = reference_merge_row(x[b], size[b], groups[b], src[b], dst[b], best[b], protected)
            assert torch.allclose(nx[b], ex, atol=1e-12, rtol=0)
            assert torch.equal(ns[b], es)
            assert torch.equal(ng[b], eg)


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_r0_is_identity(n, protected):
    x, k, size, groups = fresh(n, seed=20)
    best, dst = M.bipartite_scores(k, size, protected)
    src = M.select_fixed_r(best, size, 0, protected)
    assert not src.any()
    nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
    assert torch.equal(nx, x) and torch.equal(ns, size) and torch.equal(ng, groups)


def test_fixed_r_selects_the_r_best_edges():
    n, protected = 577, 1
    _, k, size, _ = fresh(n, seed=21)
    best, _ = M.bipartite_scores(k, size, protected)
    for r in (1, 8, 100):
        src = M.select_fixed_r(best, size, r, protected)
        for b in range(B):
            top = set(best[b].argsort(descending=True)[:r].tolist())
            assert set(src[b].nonzero().flatten().tolist()) == top


def test_negative_r_selects_nothing():
    _, k, size, _ = fresh(196, seed=22)
    best, _ = M.bipartite_scores(k, size, 0)
    assert not M.select_fixed_r(best, size, -3, 0).any()


# ------------------------------------------------------------------------------------------
# membership, unmerge, pure-merge chain
# ------------------------------------------------------------------------------------------

def check_provenance(x0, x, size, groups, n0):
    """membership 0/1, columns sum to 1, rows sum to size, x == membership @ x0 / size."""
    n_rows = size.shape[1]
    mem = M.membership(groups, n_rows)
    assert mem.shape == (x.shape[0], n_rows, n0)
    assert torch.all((mem == 0) | (mem == 1))
    assert torch.all(mem.sum(1) == 1)
    assert torch.equal(mem.sum(-1).to(size.dtype), size)
    valid = size > 0
    expect = (mem.to(F64) @ x0) / size.clamp_min(1)[..., None]
    assert torch.allclose(x[valid], expect[valid], atol=1e-12, rtol=0)
    # unmerge copies each row back to every original slot it covers
    un = M.unmerge(x, groups)
    assert un.shape == (x.shape[0], n0, x.shape[-1])
    for b in range(x.shape[0]):
        assert torch.equal(un[b], x[b][groups[b]])
        # every original token is covered by a valid row
        assert bool(valid[b][groups[b]].all())


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_pure_merge_chain_fixed_r(n, protected):
    x0, _, size, groups = fresh(n, seed=30)
    x = x0
    for step in range(5):
        k = torch.randn(B, x.shape[1], C, dtype=F64)  # fresh metric every step
        best, dst = M.bipartite_scores(k, size, protected)
        r = [8, 1, 40, 0, 1000][step]  # 1000 > cap: the cap binds
        src = M.select_fixed_r(best, size, r, protected)
        x, size, groups = M.merge_tokens(x, size, groups, src, dst, best, protected)
        assert torch.equal(size.sum(-1), torch.full((B,), float(n), dtype=F64))
        assert torch.allclose((x * size[..., None]).sum(1), x0.sum(1), atol=1e-10, rtol=0)
        check_provenance(x0, x, size, groups, n)
        if protected:
            assert torch.equal(x[:, 0], x0[:, 0]) and torch.equal((groups == 0).sum(-1), torch.ones(B, dtype=torch.long))


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_pure_merge_chain_mixed_rules_variable_counts(n, protected):
    """Threshold / batch-level steps give each image its own count, so padding appears."""
    x0, _, size, groups = fresh(n, seed=31)
    x = x0
    for step, rule in enumerate(["batch", "threshold", "fixed", "batch", "threshold"]):
        k = torch.randn(B, x.shape[1], C, dtype=F64)
        k[0] = k[0] + 2.0 * torch.randn(C, dtype=F64)  # image 0 far more redundant
        best, dst = M.bipartite_scores(k, size, protected)
        if rule == "threshold":
            arg = float(best[torch.isfinite(best)].median())
        else:
            arg = 10
        src = select(rule, best, size, protected, arg)
        # padded slots are never selected
        a_slots = torch.arange(best.shape[1]) * 2
        assert not (src & (a_slots[None] >= n_valid_rows(size)[:, None])).any()
        kept = M.survivor_counts(src, size)  # what the encoder reads in its one sync per layer
        given = M.merge_tokens(x, size, groups, src, dst, best, protected, n_new=int(kept.max()))
        x, size, groups = M.merge_tokens(x, size, groups, src, dst, best, protected)
        assert all(torch.equal(a, b) for a, b in zip(given, (x, size, groups)))
        assert torch.equal(kept, n_valid_rows(size))
        assert torch.equal(size.sum(-1), torch.full((B,), float(n), dtype=F64))
        check_provenance(x0, x, size, groups, n)
        # valid rows form a prefix
        nv = n_valid_rows(size)
        assert torch.equal(size > 0, torch.arange(size.shape[1])[None] < nv[:, None])
    assert len(set(n_valid_rows(size).tolist())) > 1  # the batch really was ragged


# ------------------------------------------------------------------------------------------
# row independence, padding
# ------------------------------------------------------------------------------------------

RULES = [("fixed", 8), ("fixed", 10_000), ("threshold", 0.2), ("threshold", -math.inf)]


@pytest.mark.parametrize("rule,arg", RULES, ids=[f"{r}-{a}" for r, a in RULES])
@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_row_independence_full_rows(n, protected, rule, arg):
    x, k, size, groups = fresh(n, seed=40)
    best, dst = M.bipartite_scores(k, size, protected)
    src = select(rule, best, size, protected, arg)
    nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
    for b in range(B):
        sl = slice(b, b + 1)
        b_best, b_dst = M.bipartite_scores(k[sl], size[sl], protected)
        assert torch.allclose(b_best, best[sl], atol=1e-12, rtol=0)
        assert torch.equal(b_dst, dst[sl])
        b_src = select(rule, b_best, size[sl], protected, arg)
        assert torch.equal(b_src, src[sl])
        bx, bs, bg = M.merge_tokens(x[sl], size[sl], groups[sl], b_src, b_dst, b_best, protected)
        m = bs.shape[1]
        assert torch.allclose(nx[sl, :m], bx, atol=1e-12, rtol=0)
        assert torch.equal(ns[sl, :m], bs) and torch.equal(ng[sl], bg)
        assert not ns[b, m:].any()


@pytest.mark.parametrize("rule,arg", RULES, ids=[f"{r}-{a}" for r, a in RULES])
@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_row_independence_with_padding(n, protected, rule, arg):
    n_valid = [n, n - 51, n - 132]  # mixed parities of the padding length
    x, k, size, groups = padded_state(n, protected, n_valid, seed=41 + n)
    best, dst = M.bipartite_scores(k, size, protected)
    src = select(rule, best, size, protected, arg)
    nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
    for b, nv in enumerate(n_valid):
        # padded A slots never selected
        assert not src[b, (torch.arange(src.shape[1]) * 2) >= nv].any()
        # the same image alone, without its padding
        sl = slice(b, b + 1)
        k1, x1, s1 = k[sl, :nv], x[sl, :nv], size[sl, :nv]
        b_best, b_dst = M.bipartite_scores(k1, s1, protected)
        na1 = b_best.shape[1]
        # same scores up to matmul blocking (the batch matrix is wider), same partners
        assert torch.allclose(b_best, best[sl, :na1], atol=1e-12, rtol=0)
        assert torch.equal(b_dst, dst[sl, :na1])
        b_src = select(rule, b_best, s1, protected, arg)
        assert torch.equal(b_src, src[sl, :na1])
        bx, bs, bg = M.merge_tokens(x1, s1, groups[sl], b_src, b_dst, b_best, protected)
        m = bs.shape[1]
        assert torch.allclose(nx[sl, :m], bx, atol=1e-12, rtol=0)
        assert torch.equal(ns[sl, :m], bs) and torch.equal(ng[sl], bg)
        # padding stays out of every group; it is size 0 after the valid prefix
        assert not ns[b, m:].any() and int(ng[b].max()) < m
        assert torch.equal(ns[b].sum(), torch.tensor(float(n), dtype=F64))
        # and the naive reference agrees
        ex, es, eg = reference_merge_row(x[b], size[b], groups[b], src[b], dst[b], best[b], protected)
        assert torch.allclose(nx[b, :m], ex, atol=1e-12, rtol=0)
        assert torch.equal(ns[b, :m], es) and torch.equal(ng[b], eg)
    # at least one row actually merged something in this configuration
    assert src.any()


def test_padded_slots_never_selected_by_batch_top():
    n, protected = 197, 1
    n_valid = [197, 120, 61]
    _, k, size, _ = padded_state(n, protected, n_valid, seed=42)
    best, _ = M.bipartite_scores(k, size, protected)
    src, _ = M.select_batch_top(best, size, 10_000, protected)  # as many as possible
    a_slots = torch.arange(best.shape[1]) * 2
    for b, nv in enumerate(n_valid):
        assert not src[b, a_slots >= nv].any()
        assert not src[b, 0]  # CLS
    # every finite edge was taken, nothing else
    assert torch.equal(src, torch.isfinite(best))


# ------------------------------------------------------------------------------------------
# order rule
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_survivors_follow_the_reference_order(n, protected):
    """[CLS, unmerged A by slot, B by slot] with a CLS token; [unmerged A by descending score,
    B by slot] without one (spec 2.6, golden README)."""
    x, k, size, groups = fresh(n, seed=50)
    # mark each token's identity in a spare channel: survivors that receive nothing keep it
    x[..., 0] = torch.arange(n, dtype=F64)
    best, dst = M.bipartite_scores(k, size, protected)
    src = M.select_fixed_r(best, size, 30, protected)
    nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
    for b in range(B):
        a_slots = [2 * a for a in range(src.shape[1]) if not src[b, a]]
        if not protected:
            scores = best[b].tolist()
            a_slots = sorted(a_slots, key=lambda slot: -scores[slot // 2])
            assert all(scores[i // 2] >= scores[j // 2] for i, j in zip(a_slots, a_slots[1:]))
        expected = torch.tensor(a_slots + list(range(1, n, 2)))
        # the surviving original slot of new row j: the one member that is not a source
        owner = torch.full((nx.shape[1],), -1)
        for p in expected.tolist():
            owner[ng[b, p]] = p
        assert torch.equal(owner, expected)
        if protected:
            assert int(owner[0]) == 0  # CLS first
        untouched = ns[b] == 1
        assert torch.equal(nx[b, untouched], x[b, expected[untouched]])


def test_score_order_ties_break_by_slot():
    """No CLS: equal best scores keep slot order; the rows are [A by score, then B]."""
    x = torch.arange(8, dtype=F64).view(1, 8, 1)
    size = torch.ones(1, 8, dtype=F64)
    best = torch.tensor([[0.5, 0.9, 0.5, 0.7]], dtype=F64)  # A slots 0, 2, 4, 6
    src = torch.tensor([[False, True, False, False]])  # slot 2 merges
    dst = torch.tensor([[0, 3, 0, 0]])  # into B slot 7
    nx, ns, ng = M.merge_tokens(x, size, torch.arange(8)[None], src, dst, best, 0)
    # kept A slots 6 (0.7), 0 (0.5), 4 (0.5, after 0 by slot), then B slots 1, 3, 5, 7
    assert nx[0, :, 0].tolist() == [6, 0, 4, 1, 3, 5, (7 + 2) / 2]
    assert ng[0].tolist() == [1, 3, 6, 4, 2, 5, 0, 6]


def test_image_that_merges_nothing_keeps_its_rows_exactly_fresh_sizes():
    n, protected = 197, 1
    x, k, size, groups = fresh(n, seed=51)
    best, dst = M.bipartite_scores(k, size, protected)
    src = M.select_fixed_r(best, size, 12, protected)
    src[1] = False  # image 1 merges nothing while the others do
    nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
    assert nx.shape[1] == n  # image 1 sets the width
    assert torch.equal(nx[1], x[1]) and torch.equal(ns[1], size[1]) and torch.equal(ng[1], groups[1])


def test_image_that_merges_nothing_keeps_its_rows_exactly_after_earlier_merges():
    """The module contract: "An image that merges nothing keeps its rows untouched."

    After earlier layers, sizes are > 1, so the rows of a non-merging image must still be
    bitwise identical (they must not go through x * size / size, which rounds)."""
    n, protected = 197, 1
    x, k, size, groups = padded_state(n, protected, [150, 150, 150], seed=52)
    x, k, size = x[:, :150], k[:, :150], size[:, :150]
    assert (size > 1).any()
    best, dst = M.bipartite_scores(k, size, protected)
    src = M.select_fixed_r(best, size, 12, protected)
    src[1] = False
    nx, ns, ng = M.merge_tokens(x, size, groups, src, dst, best, protected)
    assert torch.equal(ns[1], size[1]) and torch.equal(ng[1], groups[1])
    assert torch.equal(nx[1], x[1]), (
        f"{int((nx[1] != x[1]).sum())} values of the non-merging image changed, "
        f"max |diff| {float((nx[1] - x[1]).abs().max()):.3g}")
    # the same holds for a whole batch that merges nothing
    nx, ns, ng = M.merge_tokens(x, size, groups, torch.zeros_like(src), dst, best, protected)
    assert torch.equal(nx, x)


# ------------------------------------------------------------------------------------------
# threshold rule (peers Test 2)
# ------------------------------------------------------------------------------------------

def sorted_finite(best_row):
    return best_row[torch.isfinite(best_row)].sort(descending=True).values


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_threshold_midpoint_reproduces_fixed_r(n, protected):
    cap = cap_of(n, protected)
    checked = 0
    for seed in range(60, 64):
        x, k, size, groups = fresh(n, seed=seed)
        best, dst = M.bipartite_scores(k, size, protected)
        for b in range(B):
            sl = slice(b, b + 1)
            s = sorted_finite(best[b])
            if torch.unique(s).numel() != s.numel():
                continue  # skip seeds with ties
            rs = [1, 8, cap // 2, cap - 1]
            if s.numel() > cap:  # an odd no-CLS image has cap + 1 finite edges
                rs.append(cap)
            for r in rs:
                hi, lo = float(s[r - 1]), float(s[r])
                tau = (hi + lo) / 2
                if not lo < tau < hi:
                    continue
                by_tau = M.select_threshold(best[sl], size[sl], tau, protected)
                by_r = M.select_fixed_r(best[sl], size[sl], r, protected)
                assert torch.equal(by_tau, by_r), (seed, b, r)
                assert int(by_tau.sum()) == r
                out_tau = M.merge_tokens(x[sl], size[sl], groups[sl], by_tau, dst[sl], best[sl], protected)
                out_r = M.merge_tokens(x[sl], size[sl], groups[sl], by_r, dst[sl], best[sl], protected)
                for a, c in zip(out_tau, out_r):
                    assert torch.equal(a, c)
                checked += 1
    assert checked >= 30


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_threshold_extremes(n, protected):
    x, k, size, groups = fresh(n, seed=70)
    best, dst = M.bipartite_scores(k, size, protected)
    assert not M.select_threshold(best, size, math.inf, protected).any()
    assert not M.select_threshold(best, size, 1.0 + 1e-9, protected).any()
    cap = cap_of(n, protected)
    lowest = M.select_threshold(best, size, -math.inf, protected)
    assert torch.equal(lowest.sum(-1), torch.full((B,), cap))
    for r in (cap, cap + 5, 10**6):
        assert torch.equal(lowest, M.select_fixed_r(best, size, r, protected))
    out_a = M.merge_tokens(x, size, groups, lowest, dst, best, protected)
    out_b = M.merge_tokens(x, size, groups, M.select_fixed_r(best, size, cap, protected), dst, best, protected)
    for a, c in zip(out_a, out_b):
        assert torch.equal(a, c)
    assert out_a[0].shape[1] == n - cap


def test_threshold_extremes_with_padding():
    n, protected = 729, 0
    n_valid = [729, 500, 333]
    _, k, size, _ = padded_state(n, protected, n_valid, seed=71)
    best, _ = M.bipartite_scores(k, size, protected)
    lowest = M.select_threshold(best, size, -math.inf, protected)
    assert lowest.sum(-1).tolist() == [cap_of(v, protected) for v in n_valid]
    assert torch.equal(lowest, M.select_fixed_r(best, size, 10**6, protected))
    assert not M.select_threshold(best, size, math.inf, protected).any()


def test_threshold_is_strict():
    n, protected = 197, 1
    _, k, size, _ = fresh(n, seed=72)
    best, _ = M.bipartite_scores(k, size, protected)
    for b in range(B):
        s = sorted_finite(best[b])
        assert torch.unique(s).numel() == s.numel()
        for r in (1, 5, 20):
            tau = float(s[r - 1])  # exactly the r-th best edge
            src = M.select_threshold(best[b:b + 1], size[b:b + 1], tau, protected)
            assert int(src.sum()) == r - 1
            assert not bool(src[0, best[b] == tau].any())
            assert torch.equal(src, M.select_fixed_r(best[b:b + 1], size[b:b + 1], r - 1, protected))


def test_threshold_is_capped_per_image():
    # hand-built scores: all edges far above tau, so only the cap limits the count
    size = torch.ones(2, 11, dtype=F64)
    size[1, 7:] = 0  # 7 valid tokens
    best = torch.tensor([[-math.inf, .9, .8, .95, .7, .6],
                         [-math.inf, .9, .99, .97, -math.inf, -math.inf]], dtype=F64)
    src = M.select_threshold(best, size, 0.5, protected=1)
    assert src.sum(-1).tolist() == [5, 3]
    src = M.select_threshold(best, size, 0.85, protected=1)
    assert src.tolist() == [[False, True, False, True, False, False],
                            [False, True, True, True, False, False]]


# ------------------------------------------------------------------------------------------
# batch-level calibration rule
# ------------------------------------------------------------------------------------------

def check_batch_top(best, size, r, protected):
    src, tau = M.select_batch_top(best, size, r, protected)
    finite = torch.isfinite(best)
    n_edges = int(finite.sum())
    max_cap = max(cap_of(int(v), protected) for v in n_valid_rows(size))
    k = min(best.shape[0] * min(max(r, 0), max_cap), n_edges)
    assert int(src.sum()) == k
    assert not (src & ~finite).any()  # -inf (protected / padding) never picked
    picked, rest = best[src], best[finite & ~src]
    if k and rest.numel():
        assert picked.min() > rest.max()  # the globally best ones
    ranked = best[finite].sort(descending=True).values
    if k == n_edges:
        assert tau == (0.0 if n_edges else None)
    else:
        assert tau == max(float(ranked[k]), 0.0)
    return src, tau


@pytest.mark.parametrize("n,protected", LAYOUTS, ids=LAYOUT_IDS)
def test_batch_top_picks_global_best(n, protected):
    _, k, size, _ = fresh(n, seed=80)
    k[1] = k[1] + 1.5 * torch.randn(C, dtype=F64)  # one redundant image: uneven counts
    best, _ = M.bipartite_scores(k, size, protected)
    cap = cap_of(n, protected)
    for r in (0, 1, 8, cap, cap + 5):
        src, tau = check_batch_top(best, size, r, protected)
    src, _ = M.select_batch_top(best, size, 8, protected)
    counts = src.sum(-1)
    assert int(counts.sum()) == B * 8 and len(set(counts.tolist())) > 1
    assert counts[1] == counts.max()


def test_batch_top_threshold_is_next_edge_and_clamped():
    size = torch.ones(2, 8, dtype=F64)
    best = torch.tensor([[-math.inf, 0.9, 0.5, -0.2],
                         [0.7, 0.4, -0.1, -0.3]], dtype=F64)
    src, tau = M.select_batch_top(best, size, 1, protected=0)  # 2 edges: 0.9, 0.7
    assert src.tolist() == [[False, True, False, False], [True, False, False, False]]
    assert tau == 0.5
    src, tau = M.select_batch_top(best, size, 2, protected=0)  # 0.9 .7 .5 .4; next is -0.1
    assert int(src.sum()) == 4
    assert tau == 0.0  # clamped at >= 0
    src, tau = M.select_batch_top(best, size, 0, protected=0)
    assert not src.any() and tau == 0.9


def test_batch_top_zero_when_everything_picked_none_without_edges():
    """A batch whose budget takes every edge asks for all of them (0, the clamp, as the
    reference): never None, which the mean over batches would turn into "never merge"."""
    n, protected = 197, 1
    _, k, size, _ = fresh(n, seed=81)
    best, _ = M.bipartite_scores(k, size, protected)
    src, tau = M.select_batch_top(best, size, cap_of(n, protected), protected)
    assert tau == 0.0 and torch.equal(src, torch.isfinite(best))
    src, tau = M.select_batch_top(best, size, 0, protected, total=10**6)
    assert tau == 0.0 and torch.equal(src, torch.isfinite(best))
    one = torch.ones(2, 1, dtype=F64)  # CLS only: no edge at all
    src, tau = M.select_batch_top(torch.full((2, 1), -math.inf, dtype=F64), one, 4, protected=1)
    assert tau is None and not src.any()


def test_batch_top_with_padding():
    for n, protected in LAYOUTS:
        n_valid = [n, n - 70, n - 141]
        _, k, size, _ = padded_state(n, protected, n_valid, seed=82)
        best, _ = M.bipartite_scores(k, size, protected)
        for r in (1, 8, 50, cap_of(n - 70, protected), 10**4):
            check_batch_top(best, size, r, protected)


def test_batch_top_negative_scores_threshold_zero():
    torch.manual_seed(83)
    best = -torch.rand(3, 50, dtype=F64)  # every edge negative
    size = torch.ones(3, 100, dtype=F64)
    src, tau = check_batch_top(best, size, 4, 0)
    assert tau == 0.0 and int(src.sum()) == 12


# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------

def test_merge_cap_and_edge_ranks():
    size = torch.tensor([[1.0] * 10, [2.0] * 7 + [0.0] * 3, [1.0] + [0.0] * 9])
    assert M.merge_cap(size, 1).tolist() == [4, 3, 0]
    assert M.merge_cap(size, 0).tolist() == [5, 3, 0]
    best = torch.tensor([[0.5, 0.9, 0.5, -math.inf, 0.1]])
    assert M.edge_ranks(best).tolist() == [[1, 0, 2, 4, 3]]  # ties broken by slot


def test_a_single_token_has_no_partner() -> None:
    """One token per image: no B side, so every A score is -inf (nothing can merge)."""
    from dymu_viz.merge import bipartite_scores

    best, dst = bipartite_scores(torch.ones(2, 1, 3), torch.ones(2, 1))
    assert best.shape == (2, 1) and torch.isinf(best).all() and (best < 0).all() and dst.shape == (2, 1)
