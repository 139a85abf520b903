"""VTU on a tiny random Llama (peers.md Test 4): identity equals vanilla, each attention layer
equals scatter-mean of vanilla attention on the expanded sequence, the exact Eq. 10 kernel
equals the expansion, cached decoding equals recomputation, batch invariance, errors."""

import os
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dymu_viz.vtu import (CACHE_POLICIES, VirtualLayout, cache_bytes, cache_bytes_formula, original_rope, patch_llm,
                          unpatch_llm)

VOCAB = 128


def tiny_llama(dtype=torch.float64, attn="sdpa", seed=0, kv_heads=2, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=kv_heads,
                      num_hidden_layers=layers, vocab_size=VOCAB, attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def merged_sample(seed=0, n_text_before=5, n_virtual=16, n_compact=7, n_text_after=4):
    """Compact embeddings ids and a mapping: 5 text tokens, 16 image positions backed by 7
    compact image tokens (a random surjection), 4 text tokens."""
    g = torch.Generator().manual_seed(seed)
    image_map = torch.cat([torch.arange(n_compact), torch.randint(0, n_compact, (n_virtual - n_compact,), generator=g)])
    image_map = image_map[torch.randperm(n_virtual, generator=g)]
    P = n_text_before + n_compact + n_text_after
    mapping = torch.cat([torch.arange(n_text_before), n_text_before + image_map,
                         torch.arange(n_text_before + n_compact, P)])
    ids = torch.randint(0, VOCAB, (P,), generator=g)
    return ids, mapping


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# (VTU kernel, the vanilla attention it must reproduce); "eager" is HF's eager (float32 softmax)
KERNELS = [("sdpa", "sdpa"), ("eager", "eager"), ("exact", "sdpa")]


@pytest.mark.parametrize("kernel,vanilla", KERNELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_identity_mapping_equals_vanilla(kernel, vanilla, dtype, tol):
    model = tiny_llama(dtype, attn=vanilla)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    state = patch_llm(model, kernel)
    state.start(VirtualLayout.identity(mask), ids.shape[1])
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out[0], ref[0], atol=tol, rtol=0)
    if vanilla == "eager" and dtype == torch.float64:
        # HF's own eager path turns left-padded float64 rows into NaN (float64 min mask, float32
        # softmax); ours stays finite there, so only the unpadded sample can be compared.
        assert torch.isnan(ref[1, 3:]).all() and torch.isfinite(out[1, 3:]).all()
    else:
        assert torch.allclose(out[1, 3:], ref[1, 3:], atol=tol, rtol=0)
    unpatch_llm(model)
    again = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert torch.equal(again.nan_to_num(), ref.nan_to_num())  # unpatched again: bitwise the same (NaN where HF has NaN)
    assert model.config._attn_implementation == vanilla


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kernel,vanilla", KERNELS)
def test_attention_layer_equals_scatter_mean_of_vanilla_on_the_expansion(kernel, vanilla, window):
    """Llama layer 0 (causal), or a Qwen2 sliding layer (causal within 5 positions)."""
    if window is None:
        model, layer = tiny_llama(torch.float64, attn=vanilla), 0
    else:
        model, layer = tiny_sliding_qwen2(attn=vanilla, window=window), 1
    attn = model.model.layers[layer].self_attn
    assert getattr(attn, "sliding_window", None) == window
    ids, mapping = merged_sample()
    h = model.model.embed_tokens(ids)[None]
    V = len(mapping)
    cos, sin = model.model.rotary_emb(h[:, mapping], torch.arange(V)[None])
    i = torch.arange(V)
    allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - (window or V))
    mask = torch.zeros(V, V, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    vanilla, _ = attn(h[:, mapping], position_embeddings=(cos, sin), attention_mask=mask[None, None])
    expected = torch.zeros(1, len(ids), h.shape[-1], dtype=h.dtype).index_add_(1, mapping, vanilla)
    expected /= torch.bincount(mapping, minlength=len(ids)).to(h.dtype)[None, :, None]

    state = patch_llm(model, kernel, cache="compact")  # the layer alone, plain identity RoPE: no RoPE hook
    state.start(VirtualLayout.from_mappings([mapping]), len(ids))
    ones, zeros = torch.ones_like(cos[:, : len(ids)]), torch.zeros_like(sin[:, : len(ids)])
    out, _ = attn(h, position_embeddings=(ones, zeros), attention_mask=None)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)


def test_exact_kernel_scores_equal_rope_expansion():
    from transformers.models.llama.modeling_llama import rotate_half

    from dymu_viz.vtu import exact_scores, gather_slots
    model = tiny_llama(torch.float64)
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 9, 16, generator=g, dtype=torch.float64), torch.randn(2, 4, 9, 16, generator=g, dtype=torch.float64)
    src = torch.randint(0, 9, (2, 20), generator=g)
    pos = torch.arange(20).expand(2, 20)
    cos, sin = model.model.rotary_emb(q, pos)  # head dim 16
    qe, ke = gather_slots(q, src), gather_slots(k, src)
    qe = qe * cos[:, None] + rotate_half(qe) * sin[:, None]
    ke = ke * cos[:, None] + rotate_half(ke) * sin[:, None]
    assert torch.allclose(exact_scores(q, k, src, src, cos, sin, cos, sin), qe @ ke.transpose(-1, -2), atol=1e-10, rtol=0)


@pytest.mark.parametrize("layout", ["fresh", "cache", "pair_ordered_cache"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_gather_rotated_is_hf_rope_of_the_expansion_in_pair_order(dtype, tol, layout):
    """q / k as HF makes them ((B, P, H, D) seen as (B, H, P, D)), as a cache keeps them
    ((B, H, P, D)), or a cache already in pair order (what VTU's RoPE hook hands over)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dymu_viz.vtu import gather_rotated, gather_slots, pair_order
    model = tiny_llama(torch.float32)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 9, 4, 16, generator=g).to(dtype), torch.randn(2, 9, 2, 16, generator=g).to(dtype)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, P, D) views, as HF's
    if layout != "fresh":
        q, k = q.contiguous(), k.contiguous()
    src = torch.randint(0, 9, (2, 20), generator=g)
    pos = torch.randint(0, 500, (2, 20), generator=g).sort(-1).values
    cos, sin = (t.to(dtype) for t in model.model.rotary_emb(q.float(), pos))
    q_ref, k_ref = apply_rotary_pos_emb(gather_slots(q, src), gather_slots(k, src), cos, sin)
    assert torch.equal(gather_slots(q, src), q[torch.arange(2)[:, None], :, src].transpose(1, 2))
    paired = layout == "pair_ordered_cache"
    if paired:
        q, k = pair_order(q).flatten(-2), pair_order(k).flatten(-2)
    q_vtu, k_vtu = gather_rotated(q, src, cos, sin, paired), gather_rotated(k, src, cos, sin, paired)
    assert q_vtu.shape == q_ref.shape and k_vtu.shape == k_ref.shape
    assert torch.allclose(q_vtu.double(), pair_order(q_ref).flatten(-2).double(), atol=tol, rtol=0)
    assert torch.allclose(k_vtu.double(), pair_order(k_ref).flatten(-2).double(), atol=tol, rtol=0)
    # q and k share the head-dim permutation, so every score is HF's
    scores = q_vtu.double() @ k_vtu.double().repeat_interleave(2, 1).transpose(-1, -2)
    expected = q_ref.double() @ k_ref.double().repeat_interleave(2, 1).transpose(-1, -2)
    assert torch.allclose(scores, expected, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_rotation_matrix_is_hf_rope_then_pair_order(dtype, tol):
    """A decode step's q and k (HF's (B, 1, H, D) seen as (B, H, 1, D)) rotated by one product
    each: HF's RoPE followed by pair ordering, in HF's layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dymu_viz.vtu import pair_order, rotate_by_matrix, rotation_matrix
    model = tiny_llama(torch.float32)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(3, 1, 4, 16, generator=g).to(dtype), torch.randn(3, 1, 2, 16, generator=g).to(dtype)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.tensor([[7], [300], [0]])
    cos, sin = (t.to(dtype) for t in model.model.rotary_emb(q.float(), pos))
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    m = rotation_matrix(cos, sin)
    assert m.shape == (3, 1, 16, 16)
    for x, ref in ((q, q_ref), (k, k_ref)):
        out = rotate_by_matrix(x, m)
        assert out.shape == ref.shape
        assert torch.allclose(out.double(), pair_order(ref).flatten(-2).double(), atol=tol, rtol=0)


def test_non_rotate_half_rope_is_refused():
    model = tiny_llama(torch.float64)
    state = patch_llm(model)
    original = state.rotary
    state.rotary = lambda x, pos: tuple(t * torch.linspace(1, 2, t.shape[-1], dtype=t.dtype) for t in original(x, pos))
    state.start(VirtualLayout.from_mappings([torch.tensor([0, 1, 1, 2])]), 3)
    with pytest.raises(ValueError, match="rotate_half"):
        model(torch.tensor([[5, 6, 7]]))


def test_rope_hook_pair_orders_identity_rope_while_patched_and_is_restored_after():
    import gc

    import transformers.models.llama.modeling_llama as llama

    from dymu_viz.vtu import hooked_decoders, pair_order, rope_hooked

    gc.collect()  # patched models of earlier tests are gone and no longer count
    assert not hooked_decoders(llama.__name__)  # the hook itself goes at the next unpatch
    original = original_rope(llama.__name__)
    first, second = tiny_llama(torch.float64), tiny_llama(torch.float64)
    state = patch_llm(first, cache="compact")  # keys come back at compact length
    second_state = patch_llm(second)
    state.start(VirtualLayout.identity(torch.ones(1, 4, dtype=torch.long)), 4)  # the forward the rotary opens
    cos, sin = first.model.rotary_emb(torch.zeros(1, dtype=torch.float64), torch.arange(4)[None])
    q, k = torch.randn(1, 4, 4, 16, dtype=torch.float64), torch.randn(1, 2, 4, 16, dtype=torch.float64)
    hq, hk = llama.apply_rotary_pos_emb(q, k, cos, sin)  # no multiplications by 1: pair order for VTU
    assert torch.equal(hq, pair_order(q).flatten(-2)) and torch.equal(hk, pair_order(k).flatten(-2))
    assert state.track.per_forward["rope_calls"] == 1  # the layer's attention call learns it from the track
    real_cos, real_sin = second_state.rotary(q, torch.arange(4)[None] + 3)  # the real RoPE: the original runs
    assert all(torch.equal(a, b) for a, b in zip(llama.apply_rotary_pos_emb(q, k, real_cos, real_sin),
                                                 original(q, k, real_cos, real_sin)))
    assert rope_hooked(llama.__name__)
    unpatch_llm(first)
    assert rope_hooked(llama.__name__)  # second is still patched
    unpatch_llm(second)
    assert not rope_hooked(llama.__name__) and original_rope(llama.__name__) == original


@pytest.mark.parametrize("cache", ["compact", "decode_fast"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager", "exact"])
def test_without_the_rope_hook_vtu_gives_the_same_logits_and_tokens(kernel, cache, monkeypatch):
    """A model whose attention does not call its module's apply_rotary_pos_emb runs the real
    identity RoPE and natural-order q / k: same results. The decode-fast cache needs the hook,
    so such a model falls back to the compact cache at its first forward, with a warning."""
    import transformers.models.llama.modeling_llama as llama

    runs = []
    for hooked in (True, False):
        model = tiny_llama(torch.float64)
        state = patch_llm(model, kernel, cache=cache)
        if not hooked:
            monkeypatch.setattr(llama, "apply_rotary_pos_emb", original_rope(llama.__name__))
        ids, mapping = merged_sample(seed=2)
        state.start(VirtualLayout.from_mappings([mapping]), len(ids))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        fell_back = [w for w in caught if "using cache='compact'" in str(w.message)]
        assert len(fell_back) == (1 if cache == "decode_fast" and not hooked else 0)
        assert state.cache == ("compact" if not hooked else cache)
        assert state.hook_seen == hooked
        runs.append(out)
        monkeypatch.undo()
        unpatch_llm(model)
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].logits, runs[1].logits):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)


def test_losing_the_rope_hook_after_using_it_is_an_error(monkeypatch):
    """Keys already cached rotated cannot be continued without the hook: a clear error, not a
    silent mix of policies."""
    import transformers.models.llama.modeling_llama as llama

    model = tiny_llama(torch.float64)
    state = patch_llm(model)
    ids, mapping = merged_sample(seed=2)
    state.start(VirtualLayout.from_mappings([mapping]), len(ids))
    cache = model(input_ids=ids[None]).past_key_values
    assert state.hook_seen and state.cache == "decode_fast"
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", original_rope(llama.__name__))
    with pytest.raises(RuntimeError, match="needs every attention call to go through"):
        model(input_ids=torch.tensor([[3]]), past_key_values=cache)


def _prefill(model, ids_list, mappings):
    """Left-pad compact samples into a batch and set the VTU layout; returns (ids, mask)."""
    P = max(len(i) for i in ids_list)
    ids = torch.zeros(len(ids_list), P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    padded_maps = []
    for b, (i, m) in enumerate(zip(ids_list, mappings)):
        ids[b, P - len(i):], mask[b, P - len(i):] = i, 1
        padded_maps.append(m + P - len(i))
    model.model.dymu_vtu.start(VirtualLayout.from_mappings(padded_maps), P)
    return ids, mask


def test_batch_of_three_equals_each_alone():
    model = tiny_llama(torch.float64)
    patch_llm(model)
    samples = [merged_sample(seed=s, n_compact=c, n_virtual=v) for s, c, v in [(0, 7, 16), (1, 3, 9), (2, 11, 12)]]
    ids, mask = _prefill(model, [s[0] for s in samples], [s[1] for s in samples])
    batched = model(input_ids=ids, attention_mask=mask).logits
    for b, (i, m) in enumerate(samples):
        one_ids, one_mask = _prefill(model, [i], [m])
        alone = model(input_ids=one_ids, attention_mask=one_mask).logits[0]
        assert torch.allclose(batched[b, -len(i):], alone, atol=1e-10, rtol=0)


# (seed, compact image tokens, virtual image positions) per sample; different virtual lengths pad;
# "unmerged" cases map every token to its own slot in order (a text-only prompt, nothing merged)
CASES = {"unpadded": ("llama", [(0, 7, 16)]), "left_padded": ("llama", [(0, 7, 16), (1, 4, 9)]),
         "sliding_window": ("sliding_qwen2", [(0, 7, 16), (1, 4, 9)]),
         "unmerged_unpadded": ("llama", [(0, 7, 7)]), "unmerged_left_padded": ("llama", [(0, 7, 7), (1, 4, 4)])}


def case_samples(specs, unmerged: bool):
    """(compact ids, mapping) per sample of a case; unmerged: the identity mapping."""
    samples = [merged_sample(seed=s, n_compact=c, n_virtual=v) for s, c, v in specs]
    return [(i, torch.arange(len(i))) for i, _ in samples] if unmerged else samples


@pytest.mark.floor
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", ["sdpa", "eager", "exact"])
@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_cached_greedy_decoding_equals_recomputation_and_cache_bytes_follow_the_formula(policy, kernel, case):
    make, specs = CASES[case]
    model = tiny_llama(torch.float64, attn="eager" if kernel == "eager" else "sdpa") if make == "llama" else \
        tiny_sliding_qwen2(attn="eager" if kernel == "eager" else "sdpa", window=6)
    state = patch_llm(model, kernel, cache=policy)
    samples = case_samples(specs, case.startswith("unmerged"))
    ids, mask = _prefill(model, [s[0] for s in samples], [s[1] for s in samples])
    virtual = state.track.layout.src.shape[1]
    assert state.track.unpadded == case.endswith("unpadded")
    assert state.track.identity == case.startswith("unmerged")
    steps, P, B = 16, ids.shape[1], ids.shape[0]
    # greedy decoding with the cache, fp64 logits kept (generate's are cast to float32); no
    # autograd (this module's fixture), as under generate: compact-cache steps work in place
    out = model(input_ids=ids, attention_mask=mask)
    cached, cache, step_mask = [out.logits[:, -1]], out.past_key_values, mask
    for t in range(steps - 1):
        step_mask = torch.cat([step_mask, torch.ones(B, 1, dtype=torch.long)], 1)
        out = model(input_ids=cached[-1].argmax(-1)[:, None], attention_mask=step_mask, past_key_values=cache)
        cached.append(out.logits[:, -1])
    # recompute every step without a cache: the whole compact prefix, layout extended by hand
    seq = ids
    for t in range(steps):
        maps = [torch.cat([m + P - len(i), torch.arange(P, P + t)]) for i, m in samples]
        model.model.dymu_vtu.start(VirtualLayout.from_mappings(maps), P + t)
        logits = model(input_ids=seq, attention_mask=torch.cat([mask, torch.ones(B, t, dtype=torch.long)], 1),
                       use_cache=False).logits[:, -1]
        assert torch.allclose(logits, cached[t], atol=1e-10, rtol=0), (t, float((logits - cached[t]).abs().max()))
        seq = torch.cat([seq, logits.argmax(-1)[:, None]], 1)
    # every layer (sliding ones too: nothing cropped) holds the prompt and 15 of the 16 generated tokens
    fed = steps - 1
    assert [layer.values.shape[2] for layer in cache.layers] == [P + fed] * 2
    assert [layer.keys.shape[2] for layer in cache.layers] == [P + fed if policy == "compact" else virtual + fed] * 2
    expected = cache_bytes_formula(policy, layers=2, rows=B, kv_heads=2, head_dim=16, compact=P + fed,
                                   virtual=virtual + fed, element_size=8)
    assert cache_bytes(cache) == expected


@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_decode_steps_with_autograd_equal_without_and_backpropagate(policy):
    """With autograd on, a decode step allocates what it needs (no shared scratch buffer, no
    in-place rotation of a tensor backward needs): the logits equal the no-grad ones and a
    gradient reaches the weights through the cached keys."""
    model = tiny_llama(torch.float64)
    patch_llm(model, cache=policy)
    samples = [merged_sample(seed=0, n_compact=7, n_virtual=16), merged_sample(seed=1, n_compact=4, n_virtual=9)]
    logits = {}
    for grad in (False, True):
        ids, mask = _prefill(model, [s[0] for s in samples], [s[1] for s in samples])
        with torch.set_grad_enabled(grad):
            out = model(input_ids=ids, attention_mask=mask)
            step = torch.cat([mask, torch.ones(len(samples), 1, dtype=torch.long)], 1)
            for _ in range(3):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=step,
                            past_key_values=out.past_key_values)
                step = torch.cat([step, torch.ones(len(samples), 1, dtype=torch.long)], 1)
        logits[grad] = out.logits
    assert torch.allclose(logits[True], logits[False], atol=1e-12, rtol=0)
    with torch.enable_grad():  # this module runs under no_grad (its fixture)
        logits[True].sum().backward()
    grad = model.model.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and bool(grad.abs().sum() > 0)


@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_training_only_the_last_query_projection_backpropagates_through_decode_steps(policy):
    """Keys that need no gradient still feed a query that does: the scores' backward keeps every
    step's keys, so they must not live in a buffer the next step overwrites (which autograd
    reports as an in-place modification)."""
    model = tiny_llama(torch.float64)
    model.requires_grad_(False)
    trained = model.model.layers[-1].self_attn.q_proj.weight
    trained.requires_grad_(True)
    patch_llm(model, cache=policy)
    ids, mask = _prefill(model, [merged_sample(seed=0)[0]], [merged_sample(seed=0)[1]])
    with torch.enable_grad():
        out = model(input_ids=ids, attention_mask=mask)
        loss = out.logits[:, -1].sum()
        for _ in range(3):  # a loss over every step's logits: each step's graph is kept
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, past_key_values=out.past_key_values)
            assert not out.past_key_values.layers[-1].keys.requires_grad
            loss = loss + out.logits[:, -1].sum()
        loss.backward()
    assert trained.grad is not None and bool(trained.grad.abs().sum() > 0)


HOST_READS = ("__bool__", "__int__", "__float__", "item", "tolist", "nonzero")


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_no_host_read_per_layer(policy, kernel):
    """VTU's attention never waits for the device inside a layer (each tensor read by the host is
    a sync on a GPU): the reads of a prefill and of decode steps (left padded, GQA) are the same
    for 2 and 4 layers, so none of them is per layer."""
    samples = [merged_sample(seed=0, n_compact=7, n_virtual=16), merged_sample(seed=1, n_compact=4, n_virtual=9)]
    reads: dict[int, list[str]] = {}
    for layers in (2, 4):
        model = tiny_llama(attn=kernel, layers=layers)
        patch_llm(model, kernel, cache=policy)
        ids, mask = _prefill(model, [s[0] for s in samples], [s[1] for s in samples])
        reads[layers] = []

        def reading(name: str, log: list = reads[layers]):
            original = getattr(torch.Tensor, name)
            return lambda self, *args, **kwargs: (log.append(name), original(self, *args, **kwargs))[1]

        with pytest.MonkeyPatch.context() as m:
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, reading(name))
            out = model(input_ids=ids, attention_mask=mask)
            for _ in range(3):
                mask = torch.cat([mask, torch.ones(len(samples), 1, dtype=torch.long)], 1)
                out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask,
                            past_key_values=out.past_key_values)
    assert reads[2] == reads[4], (reads[2], reads[4])


def routes_of(model, run) -> dict[str, int]:
    """The SDPA routes VTU takes in ``run()``, and no call gives SDPA both a mask and GQA."""
    import dymu_viz.vtu.kernels as vtu  # the module that calls SDPA
    state = model.model.dymu_vtu
    state.routes.clear()
    original = vtu.F.scaled_dot_product_attention

    def checked(*args, **kwargs):
        assert not (kwargs.get("attn_mask") is not None and kwargs.get("enable_gqa")), "mask + GQA: math kernel"
        return original(*args, **kwargs)

    vtu.F.scaled_dot_product_attention = checked
    try:
        run()
    finally:
        vtu.F.scaled_dot_product_attention = original
    return dict(state.routes)


def test_sdpa_route_per_case():
    """Which path each case takes (2 layers each): no mask tensor where none is needed, repeated
    K / V instead of a mask with GQA (SDPA's math fallback materialises (B, H, V, V)), and decode
    steps as slot probabilities summed onto the compact values (either cache policy)."""
    model = tiny_llama(torch.float64)  # GQA: 4 heads, 2 kv heads
    state = patch_llm(model, cache="compact")
    (i, m), = [merged_sample(seed=0)]
    ids, mask = _prefill(model, [i], [m])
    out = model(input_ids=ids, attention_mask=mask)
    cache = out.past_key_values
    assert routes_of(model, lambda: None) == {}
    _prefill(model, [i], [m])
    assert routes_of(model, lambda: model(input_ids=ids, attention_mask=mask)) == {"causal": 2}
    _prefill(model, [i], [m])
    model(input_ids=ids, attention_mask=mask, past_key_values=cache.__class__())
    step = torch.tensor([[3]])  # a decode step: no SDPA at all, slot probabilities onto compact values
    assert routes_of(model, lambda: model(input_ids=step, past_key_values=cache)) == {"slot_probabilities": 2}
    chunk = torch.tensor([[3, 4, 5]])  # several new tokens after cached ones: an explicit causal mask
    assert routes_of(model, lambda: model(input_ids=chunk, past_key_values=cache)) == {"mask_repeat_kv": 2}
    samples = [merged_sample(seed=s, n_compact=c, n_virtual=v) for s, c, v in [(0, 7, 16), (1, 4, 9)]]  # padded
    ids2, mask2 = _prefill(model, [s[0] for s in samples], [s[1] for s in samples])
    assert routes_of(model, lambda: model(input_ids=ids2, attention_mask=mask2)) == {"mask_repeat_kv": 2}
    mha = tiny_llama(torch.float64, kv_heads=4)
    patch_llm(mha)
    ids3, mask3 = _prefill(mha, [s[0] for s in samples], [s[1] for s in samples])
    assert routes_of(mha, lambda: mha(input_ids=ids3, attention_mask=mask3)) == {"mask": 2}
    patch_llm(model, cache="decode_fast")
    ids, mask = _prefill(model, [i], [m])
    fast = model(input_ids=ids, attention_mask=mask).past_key_values
    assert routes_of(model, lambda: model(input_ids=step, past_key_values=fast)) == {"slot_probabilities": 2}
    assert state.cache == "decode_fast"
    # nothing merged (a text-only prompt): a decode step is one SDPA call over the cache as it is,
    # under either policy; a padded batch takes the mask, or with GQA the slot probabilities
    # (SDPA's fused kernel would need K / V repeated)
    unmerged = [(s[0], torch.arange(len(s[0]))) for s in samples]
    steps = torch.tensor([[3], [4]])
    for policy in CACHE_POLICIES:
        patch_llm(model, cache=policy)
        ids4, mask4 = _prefill(model, [i], [torch.arange(len(i))])
        cache4 = model(input_ids=ids4, attention_mask=mask4).past_key_values
        assert routes_of(model, lambda: model(input_ids=step, past_key_values=cache4)) == {"no_mask": 2}
        for decoder, expected in ((model, {"slot_probabilities": 2}), (mha, {"mask": 2})):
            patch_llm(decoder, cache=policy)
            ids5, mask5 = _prefill(decoder, *zip(*unmerged))
            cache5 = decoder(input_ids=ids5, attention_mask=mask5).past_key_values
            mask5 = torch.cat([mask5, torch.ones(2, 1, dtype=torch.long)], 1)
            assert routes_of(decoder, lambda: decoder(input_ids=steps, attention_mask=mask5,
                                                      past_key_values=cache5)) == expected


@pytest.mark.parametrize("policy", CACHE_POLICIES)
def test_merged_turn_after_an_unmerged_one_equals_recomputation(policy):
    """A text-only turn (every token its own slot: decode steps take SDPA over the cache as it
    is), then a turn with a merged image appended to the same cache: the track is no longer the
    identity, and every logit still equals a recomputation of the whole sequence."""
    model = tiny_llama(torch.float64)
    state = patch_llm(model, cache=policy)
    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, VOCAB, (1, 6), generator=g)
    state.start(VirtualLayout.from_mappings([torch.arange(6)]), 6)
    out = model(input_ids=text)
    seq, maps = text, [torch.arange(6)]
    for _ in range(2):  # decode steps, plain tokens
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, past_key_values=out.past_key_values)
        seq, maps = torch.cat([seq, token], 1), maps + [torch.tensor([seq.shape[1]])]
    assert state.track.identity
    ids, mapping = merged_sample(seed=3)  # 16 compact tokens on 25 slots
    first = seq.shape[1]
    slots = len(mapping)  # slot order continues the sequence
    block = VirtualLayout((first + mapping)[None], torch.arange(first, first + slots)[None],
                          torch.ones(1, slots, dtype=torch.bool))
    state.track.append(block, len(ids))
    assert not state.track.identity
    out = model(input_ids=ids[None], past_key_values=out.past_key_values)
    seq, maps = torch.cat([seq, ids[None]], 1), maps + [first + mapping]
    cached = []
    for _ in range(3):
        cached.append(out.logits[:, -1])
        token = cached[-1].argmax(-1)[:, None]
        out = model(input_ids=token, past_key_values=out.past_key_values)
        seq, maps = torch.cat([seq, token], 1), maps + [torch.tensor([seq.shape[1]])]
    cached.append(out.logits[:, -1])
    for t in range(4):  # recompute: the whole sequence, the layout of every token so far
        n = seq.shape[1] - 3 + t
        state.start(VirtualLayout.from_mappings([torch.cat(maps)[:len(torch.cat(maps)) - 3 + t]]), n)
        logits = model(input_ids=seq[:, :n], use_cache=False).logits[:, -1]
        assert torch.allclose(logits, cached[t], atol=1e-10, rtol=0), (t, float((logits - cached[t]).abs().max()))


def test_errors():
    from transformers import GPT2Config, GPT2LMHeadModel
    with pytest.raises(ValueError, match="RoPE"):
        patch_llm(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))
    model = tiny_llama()
    with pytest.raises(ValueError, match="kernel"):
        patch_llm(model, kernel="flash")
    with pytest.raises(ValueError, match="no VTU patch"):
        unpatch_llm(model)
    patch_llm(model)
    with pytest.raises(RuntimeError, match="no layout"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))


def test_torch_scatter_backend_equals_native():
    if os.environ.get("CI"):  # the README's test command installs it: in CI the backend is tested, never skipped
        import torch_scatter  # noqa: F401
    pytest.importorskip("torch_scatter", reason="optional backend: pip install --no-build-isolation torch-scatter")
    model = tiny_llama(torch.float64)
    samples = [merged_sample(seed=s, n_compact=c) for s, c in [(0, 7), (1, 4)]]
    results = []
    for backend in ("native", "torch_scatter"):
        patch_llm(model, backend=backend)
        ids, mask = _prefill(model, [s[0] for s in samples], [s[1] for s in samples])
        results.append(model(input_ids=ids, attention_mask=mask).logits)
    assert torch.allclose(results[0], results[1], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="backend"):
        patch_llm(model, backend="cuda_magic")


def tiny_sliding_qwen2(dtype=torch.float64, attn="sdpa", window=6, seed=0):
    """Qwen2 with layer 0 full and layer 1 sliding (window 6 positions)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, use_sliding_window=True, sliding_window=window,
                      max_window_layers=1, attn_implementation=attn)
    model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    return model


@pytest.mark.parametrize("kernel,vanilla", KERNELS)
def test_sliding_window_identity_equals_vanilla_and_unpatch_restores_it(kernel, vanilla):
    model = tiny_sliding_qwen2(attn=vanilla)
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    no_window = tiny_sliding_qwen2(attn=vanilla, window=100)(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ref[0, -1], no_window[0, -1], atol=1e-6)  # the window matters here
    state = patch_llm(model, kernel)
    assert model.config.layer_types == ["full_attention"] * 2  # full-length cache layers
    state.start(VirtualLayout.identity(mask), ids.shape[1])
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out[0], ref[0], atol=1e-10, rtol=0)
    if vanilla != "eager":  # HF eager float64 left padding is NaN (see above)
        assert torch.allclose(out[1, 3:], ref[1, 3:], atol=1e-10, rtol=0)
    unpatch_llm(model)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
