"""The VLM family contract, on tiny random models of every registered family's real HF classes,
through the user's own calls (the processor's chat template, ``model.generate``):

* with no merging, ``generate`` equals vanilla HF for greedy, beam search (3 beams, 2 returned)
  and seeded sampling, on batches whose prompts hold 0, 1 and 2 images, with the images passed
  nested per prompt and as one flat list, left padded; right padding gives the same;
* with merging, a second chat turn on the kept cache (text only, or with a new image) equals
  recomputing the whole conversation; a text-only call after an image call equals the
  unpatched model;
* a patched model survives ``copy.deepcopy``, pickle and ``torch.save`` / ``torch.load``: the
  copies generate the same tokens, and the original is untouched by them;
* ``unpatch_vlm`` restores the original classes, with no DyMU state or hook left.

A new family is covered by adding its tiny model to ``CASES`` (a test fails until it is).
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch

from dymu_viz import sample_photos, shapes_image, vlm
from dymu_viz.vtu import find_decoder, hooked_decoders
from tiny_models import tiny_internvl, tiny_qwen, tiny_qwen3, tiny_vlm

pytestmark = pytest.mark.usefixtures("no_grad")

# case -> (family name, tiny model factory, thresholds that merge, the next turn's user text)
CASES = {
    "llava": ("llava", lambda dtype: tiny_vlm("llava", dtype), 0.3, " user : and the colors ? assistant :"),
    "onevision": ("onevision", lambda dtype: tiny_vlm("onevision", dtype), 0.3,
                  "<|im_end|>\n<|im_start|>user and the colors ?<|im_end|>\n<|im_start|>assistant\n"),
    "qwen2_vl": ("qwen2_vl", lambda dtype: tiny_qwen("2", dtype), [0.0] * 3,
                 "<|im_end|>\n<|im_start|>user and the colors ?<|im_end|>\n<|im_start|>assistant\n"),
    "qwen2_5_vl": ("qwen2_vl", lambda dtype: tiny_qwen("2.5", dtype), [0.0] * 3,
                   "<|im_end|>\n<|im_start|>user and the colors ?<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3_vl": ("qwen3_vl", lambda dtype: tiny_qwen3(dtype), [0.0] * 3,
                 "<|im_end|>\n<|im_start|>user and the colors ?<|im_end|>\n<|im_start|>assistant\n"),
    "qwen3_vl_moe": ("qwen3_vl", lambda dtype: tiny_qwen3(dtype, moe=True), [0.0] * 3,
                     "<|im_end|>\n<|im_start|>user and the colors ?<|im_end|>\n<|im_start|>assistant\n"),
    "internvl": ("internvl", lambda dtype: tiny_internvl(dtype), [0.0] * 3,
                 "<|im_end|>\n<|im_start|>user\nand the colors ?<|im_end|>\n<|im_start|>assistant\n"),
    "internvl_tower": ("internvl", lambda dtype: tiny_internvl(dtype), 0.3,
                       "<|im_end|>\n<|im_start|>user\nand the colors ?<|im_end|>\n<|im_start|>assistant\n"),
}
QUESTIONS = ["what is in the picture ?", "describe the colors of this photo please", "is there a cat ?"]
DECODING = {"greedy": dict(do_sample=False),
            "beams": dict(do_sample=False, num_beams=3, num_return_sequences=2),
            "sampling": dict(do_sample=True, top_k=0, temperature=1.0)}


def test_every_registered_family_has_a_case() -> None:
    assert {family for family, *_ in CASES.values()} == set(vlm.FAMILIES)


def pictures(n: int) -> list:
    """A flat image (merges a lot) and small photos of different shapes."""
    photos = [p.resize((p.width // 4, p.height // 4)) for p in sample_photos(["rocket", "chelsea", "coffee"]).values()]
    return ([shapes_image(0, size=120)] + photos)[:n]


def prompt(processor, n_images: int, question: str) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def inputs_of(processor, model, per_prompt=(0, 1, 2), nested: bool = True, side: str = "left") -> dict:
    """Processor output for prompts holding ``per_prompt`` images each (images nested per prompt
    or one flat list), padded on ``side``."""
    prompts = [prompt(processor, n, q) for n, q in zip(per_prompt, QUESTIONS)]
    pics = iter(pictures(sum(per_prompt)))
    per = [[next(pics) for _ in range(n)] for n in per_prompt]
    images = per if nested else [p for ps in per for p in ps]
    processor.tokenizer.padding_side = side
    try:
        out = dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))
    finally:
        processor.tokenizer.padding_side = "left"
    for key in ("pixel_values", "pixel_values_videos"):
        if key in out:
            out[key] = out[key].to(model.dtype)
    return out


def run(model, inputs: dict, decoding: str, new: int = 4):
    """``model.generate`` with ``decoding``; ``sequences`` holds the new tokens only."""
    kwargs = dict(DECODING[decoding], max_new_tokens=new, return_dict_in_generate=True, output_scores=True)
    if decoding == "sampling":
        torch.manual_seed(7)
    out = model.generate(**inputs, **kwargs)
    out.sequences = out.sequences[:, inputs["input_ids"].shape[1]:]
    return out


def assert_same_generation(a, b, decoding: str) -> None:
    assert torch.equal(a.sequences, b.sequences)
    if decoding == "beams":
        assert torch.allclose(a.sequences_scores, b.sequences_scores, atol=1e-5, rtol=0)
    for x, y in zip(a.scores, b.scores):
        finite = torch.isfinite(x) & torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), torch.isfinite(y))
        assert torch.allclose(x[finite], y[finite], atol=1e-4, rtol=0)


@pytest.mark.floor
@pytest.mark.parametrize("decoding", list(DECODING))
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_merging_generates_what_vanilla_generates(case: str, nested: bool, decoding: str) -> None:
    _, factory, _, _ = CASES[case]
    model, processor = factory(torch.float32)
    inputs = inputs_of(processor, model, (0, 1, 2), nested)
    vanilla = run(model, inputs, decoding)
    vlm.patch_vlm(model, None)
    assert_same_generation(run(model, inputs, decoding), vanilla, decoding)
    vlm.patch_vlm(model, None, mode="compact")
    assert_same_generation(run(model, inputs, decoding), vanilla, decoding)


@pytest.mark.parametrize("case", list(CASES))
def test_right_padding_generates_what_left_padding_does(case: str) -> None:
    _, factory, thresholds, _ = CASES[case]
    model, processor = factory(torch.float32)
    left = inputs_of(processor, model, (1, 2, 1))
    vanilla = run(model, left, "beams")
    vlm.patch_vlm(model, None)
    assert_same_generation(run(model, inputs_of(processor, model, (1, 2, 1), side="right"), "beams"), vanilla, "beams")
    vlm.patch_vlm(model, thresholds)
    merged_left = run(model, left, "greedy")
    merged_right = run(model, inputs_of(processor, model, (1, 2, 1), side="right"), "greedy")
    assert_same_generation(merged_right, merged_left, "greedy")


def continued(first, processor, text: str, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The first turn's sequences followed by the next user turn, and its attention mask."""
    n = first.sequences.shape[0]
    turn = processor.tokenizer([text] * n, add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([first.sequences, turn], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones((n, ids.shape[1] - inputs["attention_mask"].shape[1]),
                                                           dtype=torch.long)], 1)
    return ids, mask


def visual_arguments(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}


def check_text_turn_on_the_kept_cache(model, processor, inputs: dict, text: str) -> None:
    """A second, text-only turn generated on the first turn's kept cache equals recomputing the
    whole conversation with its images (fp64: tokens equal, logits at 1e-8)."""
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    ids, mask = continued(first, processor, text, inputs)
    kept = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **kw)
    fresh = model.generate(input_ids=ids, attention_mask=mask, **visual_arguments(inputs), **kw)
    assert torch.equal(kept.sequences, fresh.sequences)
    for a, b in zip(kept.logits, fresh.logits):
        assert torch.allclose(a, b, atol=1e-8, rtol=0)


@pytest.mark.floor
@pytest.mark.parametrize("case", list(CASES))
def test_second_turn_on_the_kept_cache_equals_recomputation(case: str) -> None:
    """Text only: generate again on the kept cache. With a new image: the next turn holds a new
    image placeholder run and the call brings that image's pixels only; recomputation brings the
    whole conversation with every image (fp64, 1e-8)."""
    _, factory, thresholds, text = CASES[case]
    model, processor = factory(torch.float64)
    inputs = inputs_of(processor, model, (1, 1), nested=True)
    vlm.patch_vlm(model, thresholds)
    kw = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    check_text_turn_on_the_kept_cache(model, processor, inputs, text)

    # a new image in the next turn: the processor expands its placeholders; the kept cache
    # holds the first turn, so only the new image's pixels come with the call
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    new_image = pictures(3)[2:]
    extra = dict(processor(images=[new_image] * 2, text=[text + prompt(processor, 1, "and this one ?")] * 2,
                           return_tensors="pt", padding=True))
    ids = torch.cat([first.sequences, extra["input_ids"]], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones((2, ids.shape[1] - inputs["attention_mask"].shape[1]),
                                                           dtype=torch.long)], 1)
    new_visual = {k: v.to(model.dtype) if k.startswith("pixel") else v for k, v in visual_arguments(extra).items()}
    if "batch_num_images" in new_visual:
        new_visual["batch_num_images"] = torch.tensor([1, 1])
    kept = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **new_visual, **kw)
    everything = inputs_of(processor, model, (1, 1))  # the first images, then the new one per row
    all_visual = _concatenated(model, everything, {**new_visual, "input_ids": extra["input_ids"]})
    fresh = model.generate(input_ids=ids, attention_mask=mask, **all_visual, **kw)
    assert torch.equal(kept.sequences, fresh.sequences)
    for a, b in zip(kept.logits, fresh.logits):
        assert torch.allclose(a, b, atol=1e-8, rtol=0)


def _concatenated(model, first: dict, new: dict) -> dict:
    """Every row's first image followed by its new one, in HF's order (row by row); the rows of
    pixels each image takes are the family's to say (patch rows, tiles, or one per image)."""
    family = vlm.family_of(model)
    visual = family.inputs[0]
    out = {}
    for key, value in visual_arguments(first).items():
        if key == "batch_num_images":  # each image came alone in its turn, so each keeps its tiles
            out[key] = torch.ones(4, dtype=torch.long)
        elif key == visual.pixels:
            a = value.split(family.item_rows(model, visual, first))
            b = new[key].split(family.item_rows(model, visual, new))
            out[key] = torch.cat([a[0], b[0], a[1], b[1]])
        else:
            out[key] = torch.stack([value[0], new[key][0], value[1], new[key][1]]) if value.dim() > 1 else value
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_text_only_after_an_image_call_equals_the_unpatched_model(case: str) -> None:
    _, factory, thresholds, _ = CASES[case]
    model, processor = factory(torch.float32)
    text = dict(processor.tokenizer(["describe the colors", "a photo of a cat"], return_tensors="pt", padding=True))
    reference = model(**text).logits
    reference_tokens = model.generate(**text, max_new_tokens=4, do_sample=False)
    vlm.patch_vlm(model, thresholds)
    model.generate(**inputs_of(processor, model, (1, 2)), max_new_tokens=3, do_sample=False)
    valid = text["attention_mask"].bool()
    assert torch.allclose(model(**text).logits[valid], reference[valid], atol=1e-5, rtol=0)
    assert torch.equal(model.generate(**text, max_new_tokens=4, do_sample=False), reference_tokens)


def reloaded(model, how: str):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("mode", ["vtu", "compact"])
@pytest.mark.parametrize("case", list(CASES))
def test_copies_of_a_patched_model_generate_the_same_tokens(case: str, mode: str, how: str) -> None:
    _, factory, thresholds, _ = CASES[case]
    model, processor = factory(torch.float32)
    inputs = inputs_of(processor, model, (1, 2))
    vlm.patch_vlm(model, thresholds, mode=mode)
    for first_run in (False, True):  # a copy made before the original ever ran, and one made after
        if first_run:
            expected = run(model, inputs, "beams")
        copied = reloaded(model, how)
        got = run(copied, inputs, "beams")
        if not first_run:
            expected = run(model, inputs, "beams")
        assert_same_generation(got, expected, "beams")
        assert copied.dymu_vlm.last == model.dymu_vlm.last
    if mode == "vtu":  # each copy drives its own VTU state
        assert find_decoder(copied.model.language_model).dymu_vtu is not find_decoder(model.model.language_model).dymu_vtu
    assert_same_generation(run(model, inputs, "beams"), expected, "beams")


@pytest.mark.parametrize("case", list(CASES))
def test_unpatch_restores_the_original_classes_with_nothing_left(case: str) -> None:
    _, factory, thresholds, _ = CASES[case]
    model, processor = factory(torch.float32)
    inputs = inputs_of(processor, model, (1, 2))
    classes = {name: type(m) for name, m in model.named_modules()}
    attn = model.config.get_text_config()._attn_implementation
    before = hooked_decoders(type(find_decoder(model).layers[0].self_attn).__module__)
    vanilla = run(model, inputs, "greedy")

    def hooks() -> dict:  # HF keeps hooks of its own (output recording); DyMU must add none
        return {name: (list(m._forward_hooks.values()), list(m._forward_pre_hooks.values()))
                for name, m in model.named_modules()}

    hooks_before = hooks()
    vlm.patch_vlm(model, thresholds)
    run(model, inputs, "greedy")
    vlm.unpatch_vlm(model)
    assert {name: type(m) for name, m in model.named_modules()} == classes
    assert not [name for name, m in model.named_modules() if any(k.startswith("dymu") for k in m.__dict__)]
    assert hooks() == hooks_before
    assert model.config.get_text_config()._attn_implementation == attn
    assert hooked_decoders(type(find_decoder(model).layers[0].self_attn).__module__) == before
    assert_same_generation(run(model, inputs, "greedy"), vanilla, "greedy")


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_decoding_and_missing_images_are_named_clearly(case: str) -> None:
    """Prompt-lookup and assisted decoding are refused before they start (they crop the cache
    by input positions); a prompt with more image placeholders than images names the family's
    own placeholder."""
    family, factory, thresholds, _ = CASES[case]
    model, processor = factory(torch.float32)
    inputs = inputs_of(processor, model, (1, 1))
    vlm.patch_vlm(model, thresholds)
    with pytest.raises(NotImplementedError, match="prompt-lookup decoding are not supported"):
        model.generate(**inputs, prompt_lookup_num_tokens=2, max_new_tokens=3)
    with pytest.raises(NotImplementedError, match="assisted decoding"):
        model.generate(**inputs, assistant_model=copy.deepcopy(model), max_new_tokens=3)
    one_image = inputs_of(processor, model, (1,))
    two_prompts = inputs_of(processor, model, (1, 1))
    two_prompts.update({k: v for k, v in one_image.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")})
    placeholder = vlm.FAMILIES[family].placeholder("image")
    with pytest.raises(ValueError, match=f"give one image per {re.escape(placeholder)} in the prompts"):
        model(**two_prompts)


@pytest.mark.parametrize("case", list(CASES))
def test_chat_with_none_one_and_two_images_and_beams_equals_vanilla(case: str) -> None:
    """``vlm.chat`` with questions holding no image, one and two, under beam search: the tokens of
    vanilla HF's generate on the processor's own nested call (no merging)."""
    _, factory, _, _ = CASES[case]
    model, processor = factory(torch.float32)
    pics = pictures(3)
    vanilla = run(model, inputs_of(processor, model, (0, 1, 2), nested=True), "beams")
    vlm.patch_vlm(model, None)
    out = vlm.chat(model, processor, [None, pics[0], pics[1:3]], QUESTIONS, **DECODING["beams"], max_new_tokens=4)
    assert torch.equal(out.sequences, vanilla.sequences)
    assert len(out.texts) == 6 and len(out.accounting) == 6


@pytest.mark.floor
@pytest.mark.parametrize("case", list(CASES))
def test_encode_images_gives_what_the_forward_splices(case: str) -> None:
    """``vlm.encode_images`` (two prompts at a time) gives each picture as many tokens as the
    merged forward of one prompt per picture accounts for, features of the LLM's width on the
    model's device, a token for every unit; with no thresholds, every unit its own token. (The
    pixels must come from the processor's call: InternVL's processor tiles, its image processor
    alone does not, as in the released checkpoints.)"""
    _, factory, thresholds, _ = CASES[case]
    model, processor = factory(torch.float32)
    pics = pictures(3)
    with pytest.raises(ValueError, match="patch_vlm"):
        vlm.encode_images(model, processor, pics)
    vlm.patch_vlm(model, None)
    vanilla = vlm.encode_images(model, processor, pics)
    assert all(torch.equal(t.mapping.sort().values, torch.arange(len(t.mapping))) for t in vanilla)
    vlm.patch_vlm(model, thresholds)
    tokens = vlm.encode_images(model, processor, pics, batch_size=2)
    model(**inputs_of(processor, model, (1, 1, 1)))
    counts = [acc["image_tokens"] for acc in model.dymu_vlm.last]
    newlines = [c - len(t.features) for c, t in zip(counts, tokens)]  # OneVision's rows of the crop layout
    assert newlines == [0] * 3 or (case == "onevision" and all(n > 0 for n in newlines))
    assert sum(len(t.features) for t in tokens) < sum(len(t.features) for t in vanilla)  # these thresholds merge
    width = find_decoder(model).config.hidden_size
    for t, v in zip(tokens, vanilla):
        assert t.features.shape[1] == width and t.features.device == next(model.parameters()).device
        assert len(t.mapping) == len(v.mapping) and int(t.mapping.max()) + 1 == len(t.features)


def test_a_vlm_state_pickled_by_the_earlier_layout_still_runs() -> None:
    """``model.dymu_vlm`` pickled before the family seam held the settings as fields (a compact-
    mode model could be saved then): loading it gives the same settings and the model runs."""
    from dymu_viz.vlm.reductions import Pool

    model, processor = tiny_vlm("llava")
    inputs = inputs_of(processor, model, (1, 1))
    vlm.patch_vlm(model, Pool(2, 2), mode="compact")
    expected = run(model, inputs, "greedy")
    state = vlm.VLMState.__new__(vlm.VLMState)
    state.__setstate__({"mode": "compact", "kernel": "sdpa", "unit_thresholds": None, "unit_metric": "keys",
                        "temporal": None, "window": None, "pool": Pool(2, 2), "last": [], "prompt_entries": 0})
    assert state.reduction == Pool(2, 2) and state.unit_metric == "keys" and state.unit_thresholds is None
    model.dymu_vlm = state
    assert_same_generation(run(model, inputs, "greedy"), expected, "greedy")
    old_qwen = vlm.VLMState.__new__(vlm.VLMState)
    old_qwen.__setstate__({"mode": "vtu", "kernel": "sdpa", "unit_thresholds": [0.5, 0.4], "unit_metric": "blocks",
                           "temporal": 0.9, "window": 8, "pool": None, "last": [], "prompt_entries": 0})
    assert (old_qwen.unit_thresholds, old_qwen.unit_metric, old_qwen.temporal, old_qwen.window) == \
        ([0.5, 0.4], "blocks", 0.9, 8)
