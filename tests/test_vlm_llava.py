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
    out, prepared = vlm.logits(model, ids, pixels, mask)
    assert prepared.accounting[0]["image_tokens"] == N_PATCHES
    assert torch.allclose(out, ref, atol=tol, rtol=0)
    vlm.unpatch_vlm(model)
    assert torch.equal(model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)


def test_merged_image_keeps_the_virtual_layout_and_the_accounting():
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2)
    ids, mask = prompts()
    out, prepared = vlm.logits(model, ids, images(3, torch.float64), mask)
    for acc, (a, c) in zip(prepared.accounting, [(3, 4), (5, 2), (2, 6)]):
        assert acc["image_positions"] == N_PATCHES
        assert acc["llm_virtual_length"] == a + N_PATCHES + c
        assert acc["llm_compact_length"] == a + acc["image_tokens"] + c
    assert prepared.accounting[0]["image_tokens"] < N_PATCHES  # the flat image merged
    assert all(acc["crop_tokens"] == [acc["encoder_tokens"]] == [acc["image_tokens"]] for acc in prepared.accounting)
    assert prepared.layout.lengths.tolist() == [a["llm_virtual_length"] for a in prepared.accounting]


def test_batch_of_three_equals_each_alone():
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2)
    ids, mask = prompts()
    pixels = images(3, torch.float64)
    batched, prepared = vlm.logits(model, ids, pixels, mask)
    for b in range(3):
        one, p1 = vlm.logits(model, ids[b:b + 1], pixels[b:b + 1], mask[b:b + 1])
        n = p1.accounting[0]["llm_compact_length"]
        assert p1.accounting[0] == prepared.accounting[b]
        assert torch.allclose(batched[b, -n:], one[0, -n:], atol=1e-10, rtol=0)


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
    model = tiny_llava(torch.float64)
    vlm.patch_vlm(model, thresholds=0.2, mode="compact")
    ids, mask = prompts(n_before=(3,), n_after=(4,))
    pixels = images(1, torch.float64)
    out, prepared = vlm.logits(model, ids, pixels, mask)
    assert prepared.layout is None
    plain = model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask).logits
    assert torch.allclose(out, plain, atol=1e-12, rtol=0)  # the unpatched LLM on the compact sequence
    acc, = prepared.accounting
    assert acc["llm_virtual_length"] == acc["llm_compact_length"] == 7 + acc["image_tokens"]  # consecutive positions
    assert acc["image_positions"] == N_PATCHES


def test_errors():
    model = tiny_llava()
    ids, mask = prompts(n_before=(3, 5), n_after=(4, 2))
    with pytest.raises(ValueError, match="patch_vlm"):
        vlm.prepare_inputs(model, ids, images(2), mask)
    with pytest.raises(ValueError, match="3 layers"):
        vlm.patch_vlm(model, thresholds=[0.5] * 24)
    vlm.patch_vlm(model, thresholds=0.5)
    with pytest.raises(ValueError, match="3 images given but the prompts hold 2"):
        vlm.prepare_inputs(model, ids, images(3), mask)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        vlm.patch_vlm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        vlm.patch_vlm(model, mode="fast")
    model.config.vision_feature_layer = 4
    with pytest.raises(ValueError, match="vision_feature_layer 4 does not exist in a 3-layer"):
        vlm.prepare_inputs(model, ids, images(2), mask)


def test_the_tower_stops_at_the_feature_layer():
    model = tiny_llava()
    vlm.patch_vlm(model, thresholds=0.5)
    ids, mask = prompts(n_before=(3,), n_after=(4,))
    vlm.prepare_inputs(model, ids, images(1), mask)
    assert len(dymu_viz.get_state(model.model.vision_tower).last.layer_sizes) == 3  # embeddings + 2 of 3 blocks


def tiny_processor():
    """A real LlavaProcessor: HF's CLIP image processor and a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    words = ["<pad>", "<unk>", "<s>", "</s>", "USER:", "ASSISTANT:", "describe", "the", "image", "a", "cat", "dog",
             "<image>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def test_chat_takes_images_and_prompts_and_returns_text():
    from dymu_viz.data import sample_photos
    processor = tiny_processor()
    model = tiny_llava(torch.float32, vocab=13, image_token=12)
    vlm.patch_vlm(model, thresholds=0.2)
    photos = list(sample_photos(["chelsea", "rocket"]).values())
    prompts = ["USER: <image> describe the image ASSISTANT:", "USER: <image> a cat ASSISTANT:"]
    out = vlm.chat(model, processor, photos, prompts, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.texts == processor.batch_decode(out.sequences, skip_special_tokens=True)
    inputs = processor(images=photos, text=prompts, return_tensors="pt", padding=True)
    direct = vlm.generate(model, inputs.input_ids, inputs.pixel_values, inputs.attention_mask, max_new_tokens=5,
                          do_sample=False, pad_token_id=0)
    assert torch.equal(direct.sequences, out.sequences)  # right padding from the processor is handled
    for acc, n_text in zip(out.accounting, (5, 4)):  # words around the image (no BOS)
        assert acc["image_positions"] == N_PATCHES and acc["llm_virtual_length"] == n_text + N_PATCHES
    with pytest.raises(ValueError, match="one image per prompt"):
        vlm.chat(model, processor, photos[:1], prompts)
