"""DyMU in HF LLaVA-1.5 on a tiny random-init LlavaForConditionalGeneration."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import dymu_viz
from dymu_viz import vlm
from tiny_models import TINY_VLM_TEXT, TINY_VLM_VISION

VOCAB, IMAGE = 100, 99
N_PATCHES = 16  # 56 x 56 images, patch 14


def tiny_llava(dtype=torch.float32, attn="sdpa", seed=0, vocab=VOCAB, image_token=IMAGE):
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY_VLM_VISION), text_config=LlamaConfig(**TINY_VLM_TEXT, vocab_size=vocab),
        image_token_id=image_token, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.config.text_config._attn_implementation = attn  # the LLM's kernel under test
    model.config.vision_config._attn_implementation = "sdpa"  # as the DToMe tower (HF eager: float32 softmax)
    return model


def prompts(n_before=(3, 5, 2), n_after=(4, 2, 6), seed=0):
    """Processor-style prompts: text, 16 image placeholders, text; left-padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(0, IMAGE, (a,), generator=g), torch.full((N_PATCHES,), IMAGE),
                       torch.randint(0, IMAGE, (c,), generator=g)]) for a, c in zip(n_before, n_after)]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    return ids, mask


def images(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 56, 56, generator=g)
    x[0] = 0.3  # a flat image merges a lot
    return x.to(dtype)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_no_merging_equals_the_unpatched_model(attn, dtype, tol):
    model = tiny_llava(dtype, attn)
    ids, mask = prompts(n_before=(3,), n_after=(4,))
    pixels = images(1, dtype)
    ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    vlm.patch_vlm(model, thresholds=float("inf"), kernel=attn)
    out, accounting = vlm.logits(model, ids, pixels, mask)
    assert accounting[0]["image_tokens"] == N_PATCHES
    assert torch.allclose(out, ref, atol=tol, rtol=0)
    vlm.unpatch_vlm(model)
    assert type(model) is LlavaForConditionalGeneration
    assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)


def test_merged_image_keeps_the_virtual_layout_and_the_accounting():
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2)
    ids, mask = prompts()
    _, accounting = vlm.logits(model, ids, images(3, torch.float64), mask)
    for acc, (a, c) in zip(accounting, [(3, 4), (5, 2), (2, 6)]):
        assert acc["image_positions"] == N_PATCHES and acc["text_tokens"] == a + c
        assert acc["llm_virtual_length"] == a + N_PATCHES + c
        assert acc["llm_compact_length"] == a + acc["image_tokens"] + c
    assert accounting[0]["image_tokens"] < N_PATCHES  # the flat image merged
    assert all(acc["crop_tokens"] == [acc["encoder_tokens"]] == [acc["image_tokens"]] for acc in accounting)


def test_batch_of_three_equals_each_alone():
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2)
    ids, mask = prompts()
    pixels = images(3, torch.float64)
    batched, accounting = vlm.logits(model, ids, pixels, mask)
    for b in range(3):
        one, acc1 = vlm.logits(model, ids[b:b + 1], pixels[b:b + 1], mask[b:b + 1])
        assert acc1[0] == accounting[b]
        valid = mask[b].bool()
        assert torch.allclose(batched[b, valid], one[0, valid], atol=1e-10, rtol=0)


def test_generate_matches_step_by_step_recomputation():
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2)
    ids, mask = prompts(n_before=(3, 5), n_after=(4, 2))
    pixels = images(2, torch.float64)
    out = vlm.generate(model, ids, pixels, mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.sequences.shape == (2, 8)
    for acc in out.accounting:
        assert acc["kv_cache_entries"] == acc["llm_compact_length"] + 7
    seq_ids, seq_mask = ids, mask
    for t in range(8):  # recompute without a cache: the prompt plus the tokens so far
        logits, _ = vlm.logits(model, seq_ids, pixels, seq_mask)
        nxt = logits[:, -1].argmax(-1)
        assert torch.equal(nxt, out.sequences[:, t])
        seq_ids = torch.cat([seq_ids, nxt[:, None]], 1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)[:, None]], 1)


def test_compact_mode_is_the_w_o_vtu_ablation():
    """The unpatched LLM on [text, compact image tokens in order of their first patch, text] at
    consecutive positions."""
    from dymu_viz.vlm.families.llava import llava_images
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2, mode="compact")
    ids, mask = prompts(n_before=(3,), n_after=(4,))
    pixels = images(1, torch.float64)
    out, (acc,) = vlm.logits(model, ids, pixels, mask)
    image, = llava_images(model, pixels)
    first = [int((image.mapping == j).nonzero()[0]) for j in range(len(image.features))]
    assert first == sorted(first) and len(first) < N_PATCHES  # merged rows, in order of their first patch
    embed = model.get_input_embeddings()
    compact = torch.cat([embed(ids[0, :3]), image.features, embed(ids[0, -4:])])[None]
    hidden = model.model.language_model(inputs_embeds=compact).last_hidden_state
    plain = model.lm_head(hidden)
    assert torch.allclose(out[0, :3], plain[0, :3], atol=1e-12, rtol=0)
    assert torch.allclose(out[0, -4:], plain[0, -4:], atol=1e-12, rtol=0)
    assert acc["llm_virtual_length"] == acc["llm_compact_length"] == 7 + acc["image_tokens"]  # consecutive positions
    assert acc["image_positions"] == N_PATCHES


def test_errors():
    model = tiny_llava()
    ids, mask = prompts(n_before=(3, 5), n_after=(4, 2))
    with pytest.raises(ValueError, match="patch_vlm"):
        vlm.logits(model, ids, images(2), mask)
    with pytest.raises(ValueError, match="3 layers"):
        vlm.patch_vlm(model, thresholds=[0.5] * 24)
    vlm.patch_vlm(model, thresholds=0.5)
    with pytest.raises(ValueError, match="3 images given but the prompts hold image placeholders for 2"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(3))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        vlm.patch_vlm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        vlm.patch_vlm(model, mode="fast")
    model.config.vision_feature_layer = 4
    with pytest.raises(ValueError, match="vision_feature_layer 4 does not exist in a 3-layer"):
        model(input_ids=ids, attention_mask=mask, pixel_values=images(2))


def test_the_tower_stops_at_the_feature_layer():
    model = tiny_llava()
    vlm.patch_vlm(model, thresholds=0.5)
    ids, mask = prompts(n_before=(3,), n_after=(4,))
    model(input_ids=ids, attention_mask=mask, pixel_values=images(1))
    assert len(dymu_viz.get_state(model.model.vision_tower).last.layer_sizes) == 3  # embeddings + 2 of 3 blocks
