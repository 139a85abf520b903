"""A DyMU-patched LLaVA-1.5 / LLaVA-OneVision is a normal HF model: the researcher's usual snippet,
``model.generate(**processor(images=..., text=..., return_tensors="pt"))``, runs DyMU after one
``patch_vlm`` line, with every generation feature, and nothing gives silently wrong numbers.

Tiny random models of the exact classes with a real HF processor (stand-in tokenizer). With
no merging DyMU must reproduce the unpatched model (fp32: 1e-5; fp64: 1e-10); with merging,
HF's own generate must equal dymu_viz's convenience and cached continuations must equal
recomputation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from dymu_viz import vlm
from dymu_viz.data import sample_photos, shapes_image
from dymu_viz.vtu import original_rope
from tiny_models import VLM_QUESTIONS, check_causal_and_cached_decode, check_half_precision, tiny_vlm

FAMILIES = ["llava", "onevision"]
QUESTIONS = VLM_QUESTIONS
pytestmark = pytest.mark.usefixtures("no_grad")


def photos(n: int) -> list:
    """A flat image (merges a lot) and real photos of different sizes."""
    pics = [shapes_image(0, size=120)] + list(sample_photos(["rocket", "chelsea", "coffee"]).values())
    return pics[:n]


def conversation(n_images: int, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


def batch(processor, model, images_per_prompt=(1, 1, 1), side: str = "left", questions=QUESTIONS) -> dict:
    """Processor output for prompts built by the chat template (left padding unless side says)."""
    prompts = [processor.apply_chat_template(conversation(n, q), add_generation_prompt=True)
               for n, q in zip(images_per_prompt, questions)]
    pics = iter(photos(sum(images_per_prompt)))
    nested = [[next(pics) for _ in range(n)] for n in images_per_prompt]
    processor.tokenizer.padding_side = side
    try:
        inputs = processor(images=nested, text=prompts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"
    inputs = dict(inputs)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def assert_close_logits(a, b, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol, rtol=0), float((x - y).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_hf_generate_runs_dymu(family: str, decoding: str) -> None:
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    assert (inputs["attention_mask"] == 0).any()  # left padding in the batch
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if decoding == "beam":
        kw.update(num_beams=2, num_return_sequences=2)
    reference = model.generate(**inputs, **kw)

    vlm.patch_vlm(model, thresholds=float("inf"))  # DyMU with no merging: the unpatched numbers
    same = model.generate(**inputs, **kw)
    assert torch.equal(same.sequences, reference.sequences)
    assert_close_logits(same.logits, reference.logits, 1e-5)

    vlm.patch_vlm(model, thresholds=0.3)
    merged = model.generate(**inputs, **kw)
    last = model.dymu_vlm.last
    assert any(acc["image_tokens"] < acc["image_positions"] for acc in last), "the thresholds must merge"
    assert all(acc["llm_virtual_length"] == acc["text_tokens"] + acc["image_positions"] for acc in last)
    plain_kw = {k: v for k, v in kw.items() if k not in ("output_logits", "return_dict_in_generate")}
    ours = vlm.generate(model, **inputs, **plain_kw)
    assert torch.equal(ours.sequences, merged.sequences[:, inputs["input_ids"].shape[1]:])
    assert len(ours.accounting) == merged.sequences.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_both_cache_policies_generate_the_same(family: str, decoding: str) -> None:
    """The decode-fast cache (expanded rotated keys, compact values) and the compact one give the
    same answers and step logits (fp64), with merging, greedy and beam search."""
    model, processor = tiny_vlm(family, torch.float64)
    inputs = batch(processor, model)
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if decoding == "beam":
        kw.update(num_beams=2, num_return_sequences=2)
    runs = {}
    for cache in ("compact", "decode_fast"):
        vlm.patch_vlm(model, thresholds=0.3, cache=cache)
        runs[cache] = model.generate(**inputs, **kw)
    assert torch.equal(runs["compact"].sequences, runs["decode_fast"].sequences)
    assert_close_logits(runs["compact"].logits, runs["decode_fast"].logits, 1e-6)  # generate casts to float32
    entries = runs["decode_fast"].past_key_values
    assert entries.layers[0].keys.shape[2] > entries.layers[0].values.shape[2]  # keys per virtual slot


@pytest.mark.parametrize("cache", ["compact", "decode_fast"])
def test_generate_accounting_reports_the_cache(cache: str) -> None:
    """Per returned sequence: the policy, compact entries (values), key entries (one per virtual
    slot with decode-fast) and bytes that match the documented formula."""
    from dymu_viz.vtu import cache_bytes_formula
    model, processor = tiny_vlm("llava")
    inputs = batch(processor, model)
    vlm.patch_vlm(model, thresholds=0.3, cache=cache)
    out = vlm.generate(model, **inputs, max_new_tokens=5, do_sample=False)
    for acc in out.accounting:
        assert acc["kv_cache_policy"] == cache
        assert acc["kv_cache_entries"] == acc["llm_compact_length"] + 4  # the last token is not fed
        assert acc["kv_key_entries"] == (acc["llm_virtual_length"] if cache == "decode_fast"
                                         else acc["llm_compact_length"]) + 4
    text = model.config.get_text_config()
    compact = max(acc["kv_cache_entries"] for acc in out.accounting)  # the batch is padded to its longest row
    virtual = max(acc["kv_key_entries"] for acc in out.accounting) if cache == "decode_fast" else compact
    per_row = cache_bytes_formula(cache, text.num_hidden_layers, 1, text.num_key_value_heads,
                                  text.hidden_size // text.num_attention_heads, compact, virtual, 4)
    assert out.accounting[0]["kv_cache_bytes_per_sample_padded"] == per_row


def test_accounting_reports_the_policy_that_ran_after_a_fallback(monkeypatch) -> None:
    """A decoder whose attention bypasses the RoPE hook falls back to the compact cache; the
    accounting says so (it reads the VTU state, not the policy asked for)."""
    import transformers.models.llama.modeling_llama as llama

    model, processor = tiny_vlm("llava")
    inputs = batch(processor, model)
    vlm.patch_vlm(model, thresholds=0.3, cache="decode_fast")
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", original_rope(llama.__name__))
    with pytest.warns(UserWarning, match="using cache='compact'"):
        out = vlm.generate(model, **inputs, max_new_tokens=3, do_sample=False)
    assert {acc["kv_cache_policy"] for acc in out.accounting} == {"compact"}
    assert all(acc["kv_key_entries"] == acc["kv_cache_entries"] for acc in out.accounting)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_logits_in_the_input_coordinates(family: str) -> None:
    """model(**inputs): logits of every input position, the unpatched model's with no merging."""
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    reference = model(**inputs).logits
    vlm.patch_vlm(model, thresholds=float("inf"))
    out = model(**inputs)
    valid = inputs["attention_mask"].bool()
    assert out.logits.shape == reference.shape
    assert torch.allclose(out.logits[valid], reference[valid], atol=1e-5, rtol=0)
    assert isinstance(out.past_key_values, vlm.DyMUCache)
    assert out.past_key_values.get_seq_length() == inputs["input_ids"].shape[1]  # counted as HF counts
    kept = model(**inputs, logits_to_keep=1).logits
    assert kept.shape[1] == 1 and torch.allclose(kept[:, 0], out.logits[:, -1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "exact"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("cache", ["compact", "decode_fast"])
def test_second_turn_with_the_cache_kept_equals_recomputation(kernel: str, padded: bool, cache: str) -> None:
    model, processor = tiny_vlm("llava", torch.float64, attn="eager" if kernel == "eager" else "sdpa")
    n = 3 if padded else 1
    inputs = batch(processor, model, images_per_prompt=(1,) * n, questions=QUESTIONS[:n])
    vlm.patch_vlm(model, thresholds=0.3, kernel=kernel, cache=cache)
    first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    turn = processor.tokenizer([" user : and the colors ? assistant :"] * n, add_special_tokens=False,
                               return_tensors="pt").input_ids
    ids = torch.cat([first.sequences, turn], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones((n, ids.shape[1] - inputs["attention_mask"].shape[1]),
                                                           dtype=torch.long)], 1)
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    kept = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **kw)
    fresh = model.generate(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], **kw)
    assert torch.equal(kept.sequences, fresh.sequences)
    assert_close_logits(kept.logits, fresh.logits, 1e-10)
    assert kept.past_key_values.compact_length() == fresh.past_key_values.compact_length()


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_call_after_an_image_call_equals_the_unpatched_model(family: str) -> None:
    model, processor = tiny_vlm(family)
    text = dict(processor.tokenizer(["describe the colors", "a photo of a cat"], return_tensors="pt", padding=True))
    reference = model(**text).logits
    reference_tokens = model.generate(**text, max_new_tokens=4, do_sample=False)
    vlm.patch_vlm(model, thresholds=0.3)
    model.generate(**batch(processor, model), max_new_tokens=3, do_sample=False)
    valid = text["attention_mask"].bool()
    assert torch.allclose(model(**text).logits[valid], reference[valid], atol=1e-5, rtol=0)
    assert torch.equal(model.generate(**text, max_new_tokens=4, do_sample=False), reference_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_one_prompt_equal_vanilla_with_no_merging(family: str) -> None:
    """LLaVA-1.5: two <image> in one prompt; OneVision: its template's adjacent <image><image>,
    each image of a multi-image sample one crop (batch_num_images), as HF does."""
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model, images_per_prompt=(2, 1), questions=QUESTIONS[:2])
    if family == "onevision":
        assert inputs["batch_num_images"].tolist() == [2, 1]
        assert "<image><image>" in processor.apply_chat_template(conversation(2, "x"))
    reference = model(**inputs).logits
    reference_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    vlm.patch_vlm(model, thresholds=float("inf"))
    valid = inputs["attention_mask"].bool()
    assert torch.allclose(model(**inputs).logits[valid], reference[valid], atol=1e-5, rtol=0)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), reference_tokens)
    crops = [len(acc["crop_tokens"]) for acc in model.dymu_vlm.last]
    if family == "onevision":
        assert crops[0] == 2 and crops[1] > 1  # one crop per image of the two-image sample; AnyRes for the other
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    vlm.unpatch_vlm(model)
    reference_beams = model.generate(**inputs, **beams)
    vlm.patch_vlm(model, thresholds=float("inf"))  # beams expand each sample's images together
    assert torch.equal(model.generate(**inputs, **beams), reference_beams)
    vlm.patch_vlm(model, thresholds=0.3)
    tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert tokens.shape == reference_tokens.shape
    assert model.dymu_vlm.last[0]["image_positions"] == sum(1 for t in inputs["input_ids"][0]
                                                           if t == model.config.image_token_id)


class StopAfter(StoppingCriteria):
    def __init__(self, prompt_length: int, new: int):
        self.prompt_length, self.new = prompt_length, new

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.prompt_length + self.new, dtype=torch.bool)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_return_sequences_and_stopping_criteria(family: str) -> None:
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    L = inputs["input_ids"].shape[1]
    kw = dict(do_sample=True, num_return_sequences=2, max_new_tokens=8, top_k=20,
              stopping_criteria=StoppingCriteriaList([StopAfter(L, 3)]))
    torch.manual_seed(7)
    reference = model.generate(**inputs, **kw)
    vlm.patch_vlm(model, thresholds=float("inf"))
    torch.manual_seed(7)
    out = model.generate(**inputs, **kw)
    assert out.shape == (6, L + 3) and torch.equal(out, reference)
    vlm.patch_vlm(model, thresholds=0.3)
    torch.manual_seed(7)
    assert model.generate(**inputs, **kw).shape == (6, L + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_gives_the_left_padded_results(family: str) -> None:
    """DyMU re-pads the compact sequence on the left, so a right-padded batch (which vanilla HF
    generation gets wrong) gives the same answers as a left-padded one."""
    model, processor = tiny_vlm(family)
    vlm.patch_vlm(model, thresholds=0.3)
    left = batch(processor, model)
    right = batch(processor, model, side="right")
    assert (right["attention_mask"][:, -1] == 0).any()
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(vlm.generate(model, **right, **kw).sequences, vlm.generate(model, **left, **kw).sequences)
    a, b = model(**left).logits, model(**right).logits
    assert torch.allclose(a[left["attention_mask"].bool()], b[right["attention_mask"].bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_finite_and_close_to_fp32(family: str, dtype: torch.dtype) -> None:
    """Measured on these models: max |logit difference| to fp32 with no merging 0.0046 / 0.0062
    (bf16, LLaVA / OneVision) and 0.00075 (fp16), against logits up to 0.65; 0.02 and 0.003 are
    asserted."""
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    vlm.patch_vlm(model, thresholds=float("inf"))
    check_half_precision(model, inputs, dtype)
    vlm.patch_vlm(model, thresholds=0.3)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(step).all() for step in out.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_applies_the_template(family: str) -> None:
    model, processor = tiny_vlm(family)
    vlm.patch_vlm(model, thresholds=0.3)
    pics = photos(3)
    questions = QUESTIONS[:2]
    out = vlm.chat(model, processor, [pics[0], [pics[1], pics[2]]], questions, max_new_tokens=4, do_sample=False)
    prompts = [processor.apply_chat_template(conversation(n, q), add_generation_prompt=True)
               for n, q in zip((1, 2), questions)]
    inputs = processor(images=[[pics[0]], [pics[1], pics[2]]], text=prompts, return_tensors="pt", padding=True)
    direct = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, direct[:, inputs["input_ids"].shape[1]:])
    assert out.texts == processor.batch_decode(out.sequences, skip_special_tokens=True)
    assert [acc["image_positions"] > 0 for acc in out.accounting] == [True, True]
    with pytest.raises(ValueError, match="one entry per question"):
        vlm.chat(model, processor, pics[:1], questions)


def test_static_cache_and_cropping_are_refused_clearly() -> None:
    model, processor = tiny_vlm("llava")
    inputs = batch(processor, model)
    vlm.patch_vlm(model, thresholds=0.3)
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(**inputs, max_new_tokens=3, cache_implementation="static")
    cache = model(**inputs).past_key_values
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_gets_clear_errors(family: str) -> None:
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    with pytest.raises(ValueError, match="3 layers"):
        vlm.patch_vlm(model, thresholds=[0.5] * 24)
    vlm.patch_vlm(model, thresholds=0.5)
    fewer = dict(inputs, pixel_values=inputs["pixel_values"][:2])
    if "image_sizes" in fewer:
        fewer.update(image_sizes=inputs["image_sizes"][:2], batch_num_images=inputs["batch_num_images"][:2])
    with pytest.raises(ValueError, match="2 images given but the prompts hold more image placeholders"):
        model(**fewer)
    with pytest.raises(NotImplementedError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, model.config.get_text_config().hidden_size))
    if family == "onevision":  # a video the prompts hold no <video> for
        text_only = processor(text=["hello there"], return_tensors="pt")["input_ids"]
        with pytest.raises(ValueError, match="1 videos given but the prompts hold video placeholders for 0"):
            model(input_ids=text_only, pixel_values_videos=torch.zeros(1, 2, 3, 56, 56))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_image_text_to_text_pipeline_runs_dymu(family: str) -> None:
    from transformers import pipeline
    model, processor = tiny_vlm(family)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "image": photos(2)[1]},
                                             {"type": "text", "text": "what is this ?"}]}]
    reference = pipe(text=messages, max_new_tokens=5, do_sample=False)[0]["generated_text"][-1]
    vlm.patch_vlm(model, thresholds=float("inf"))
    assert pipe(text=messages, max_new_tokens=5, do_sample=False)[0]["generated_text"][-1] == reference
    vlm.patch_vlm(model, thresholds=0.3)
    pipe(text=messages, max_new_tokens=5, do_sample=False)
    acc, = model.dymu_vlm.last
    assert acc["image_tokens"] < acc["image_positions"]  # the pipeline's call merged


def test_load_vlm_dtype_and_placement() -> None:
    loaded = vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", vision_layers=1, dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16 and loaded.weights.endswith("; bfloat16 on cpu")
    assert vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", vision_layers=1).model.dtype == torch.float32
    with pytest.raises(ValueError, match="device_map is for real weights"):
        vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", vision_layers=1, device_map="auto")
    with pytest.raises(ValueError, match="not both"):
        vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", device="cpu", device_map="auto")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["vtu", "compact"])
def test_a_generated_image_token_is_an_ordinary_token_as_in_hf(family: str, mode: str) -> None:
    """A model may generate the <image> token; vanilla HF embeds it like any token in the next
    decode step (no pixels come with it), so the patched model must too (it raised before)."""
    from tiny_models import forcing_token

    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    image_token = model.config.image_token_id
    kw = dict(max_new_tokens=5, do_sample=False,
              logits_processor=forcing_token(image_token, inputs["input_ids"].shape[1] + 1))
    reference = model.generate(**inputs, **kw)
    assert (reference[:, inputs["input_ids"].shape[1] + 1] == image_token).all()
    vlm.patch_vlm(model, None, mode=mode)
    assert torch.equal(model.generate(**inputs, **kw), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_mode_with_merging_is_causal_in_a_padded_batch(family: str) -> None:
    """Compact mode with merging in a left-padded batch is causal and its cached generation equals
    recomputation. (HF's mask functions placed the queries after the cache's *input* length, so
    queries saw later tokens; unpadded batches skip the mask and hid it.)"""
    model, processor = tiny_vlm(family)
    inputs = batch(processor, model)
    assert (inputs["attention_mask"] == 0).any()
    vlm.patch_vlm(model, 0.3, mode="compact")
    check_causal_and_cached_decode(model, inputs)
