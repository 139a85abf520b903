"""Qwen3-VL's own parts, on tiny random models of its real classes (the family contract -- no
merging = vanilla, cached turns, copies -- is in test_family_contract.py): DeepStack features
merged with the same groups as the units, VTU with DeepStack equal to the virtual
computation, layer by layer, written out by hand, and each photo the same alone and in a batch
(Qwen2.5-VL too)."""

from __future__ import annotations

import pytest
import torch

from dymu_viz import sample_photos, shapes_image, vlm
from tiny_models import tiny_qwen3

pytestmark = pytest.mark.usefixtures("no_grad")


def inputs_of(processor, dtype=torch.float64) -> dict:
    """Two prompts, a flat image and a photo, left padded (the flat one merges a lot)."""
    pics = [shapes_image(0, size=96), sample_photos(["chelsea"])["chelsea"].resize((112, 75))]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                              "text": q}]}], add_generation_prompt=True)
               for q in ("what is in the picture ?", "describe the colors of this photo please")]
    out = dict(processor(images=[[p] for p in pics], text=prompts, return_tensors="pt", padding=True))
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def test_merged_deepstack_is_the_size_weighted_mean_of_its_units() -> None:
    model, processor = tiny_qwen3(torch.float64)
    inputs = inputs_of(processor)
    images = vlm.qwen.qwen_images(model, inputs["pixel_values"], inputs["image_grid_thw"], [0.0] * 3)
    units = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    for i, image in enumerate(images):
        assert image.extras.shape == (len(image.features), levels, model.config.text_config.hidden_size)
        assert len(image.features) < len(image.mapping)  # it merged
        for level in range(levels):
            per_unit = units.deepstack_features[level][i]  # (U, D)
            sums = torch.zeros_like(image.extras[:, level]).index_add_(0, image.mapping, per_unit)
            sizes = torch.bincount(image.mapping, minlength=len(image.features)).to(sums)
            assert torch.allclose(image.extras[:, level], sums / sizes[:, None], atol=1e-12, rtol=0)
        main = torch.zeros_like(image.features).index_add_(0, image.mapping, units.pooler_output[i])
        assert torch.allclose(image.features, main / sizes[:, None], atol=1e-12, rtol=0)


def virtual_logits(model, inputs: dict, images: list) -> torch.Tensor:
    """The virtual computation, by hand, one prompt at a time: every image position holds its
    compact token; each layer attends over the vanilla positions (HF's own M-RoPE, causal), the
    copies of a compact token are averaged after attention (so they stay one token), and after
    layer l each image position gains its compact token's DeepStack level l. Logits (B, L, V)."""
    lm = model.model.language_model
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                        attention_mask=mask)
    out = torch.zeros(*ids.shape, model.config.text_config.vocab_size, dtype=torch.float64)
    for b, image in enumerate(images):
        valid = mask[b].bool()
        row_ids = ids[b][valid]
        is_image = row_ids == model.config.image_token_id
        n_img = len(image.features)
        # compact row of every position: image positions by the mapping, text positions their own
        compact = torch.empty(len(row_ids), dtype=torch.long)
        compact[is_image] = image.mapping
        compact[~is_image] = n_img + torch.arange(int((~is_image).sum()))
        h = lm.embed_tokens(row_ids)[None].clone()
        h[0, is_image] = image.features[image.mapping]
        cos_sin = lm.rotary_emb(h, pos[:, b:b + 1, valid])
        V = len(row_ids)
        causal = torch.full((V, V), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        sizes = torch.bincount(compact).to(h)
        for layer_index, layer in enumerate(lm.layers):
            attn, _ = layer.self_attn(layer.input_layernorm(h), attention_mask=causal, position_embeddings=cos_sin)
            mean = torch.zeros(len(sizes), h.shape[-1], dtype=h.dtype).index_add_(0, compact, attn[0]) / sizes[:, None]
            h = h + mean[compact][None]
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if layer_index < image.extras.shape[1]:
                h[0, is_image] = h[0, is_image] + image.extras[image.mapping, layer_index]
        out[b, valid] = model.lm_head(lm.norm(h))[0]
    return out


@pytest.mark.parametrize("mode", ["vtu", "compact"])
def test_vtu_with_deepstack_equals_the_virtual_computation(mode: str) -> None:
    """fp64, two layers (DeepStack adds after both), a left-padded batch: the patched model's
    logits at every text position equal the virtual computation's; in "compact" mode (the w/o VTU
    ablation) they do not, and neither do they without the merged DeepStack."""
    model, processor = tiny_qwen3(torch.float64)  # sdpa: float64 throughout (eager softmaxes in float32)
    inputs = inputs_of(processor)
    vlm.patch_vlm(model, [0.0] * 3, mode=mode)
    images = vlm.qwen.qwen_images(model, inputs["pixel_values"], inputs["image_grid_thw"], [0.0] * 3)
    patched = model(**inputs).logits
    vlm.unpatch_vlm(model)
    reference = virtual_logits(model, inputs, images)
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != model.config.image_token_id)
    if mode == "vtu":
        assert torch.allclose(patched[text], reference[text], atol=1e-9, rtol=0), \
            float((patched[text] - reference[text]).abs().max())
        without = [type(im)(im.features, im.mapping, im.crop_tokens, torch.zeros_like(im.extras)) for im in images]
        assert (virtual_logits(model, inputs, without)[text] - reference[text]).abs().max() > 1e-4  # DeepStack counts
    else:
        assert (patched[text] - reference[text]).abs().max() > 1e-4


@pytest.mark.parametrize("model_id", ["Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"])
def test_load_vlm_builds_the_real_tower_width_and_runs_dymu(model_id: str) -> None:
    """The known ids at random: the real ViT width and patch, DeepStack levels kept among the
    blocks built, a scaled-down LLM; the processor's own expansion; DyMU generates."""
    torch.manual_seed(0)
    loaded = vlm.load_vlm(model_id, "random", "cpu", vision_layers=6)
    spec = vlm.models.VLM_MODELS[model_id]
    vision = loaded.model.config.vision_config
    assert (vision.hidden_size, vision.patch_size, vision.depth) == (spec.vision["hidden_size"], 16, 6)
    assert vision.deepstack_visual_indexes == ([i for i in spec.vision["deepstack_visual_indexes"] if i < 6] or [5])
    assert loaded.weights.startswith("RANDOM init (asked for): Qwen3VLForConditionalGeneration") and "DeepStack" in loaded.weights
    image = sample_photos(["rocket"])["rocket"].resize((128, 96))
    vlm.patch_vlm(loaded.model, [0.5] * 2)
    out = vlm.chat(loaded.model, loaded.processor, [image], ["what is in the picture ?"], max_new_tokens=3)
    acc = out.accounting[0]
    assert acc["image_positions"] == (96 // 32) * (128 // 32) and acc["image_tokens"] <= acc["image_positions"]
    assert len(out.texts) == 1


def test_calibrated_rounds_keep_about_the_asked_share() -> None:
    model, processor = tiny_qwen3()
    photos = [p.resize((128, 96)) for p in sample_photos().values()]
    thresholds = vlm.qwen.calibrate_rounds(model, processor, photos, keep=0.5, rounds=2, batch_size=3, progress=False)
    assert thresholds.metadata["kind"] == vlm.qwen.ROUNDS_KIND and len(thresholds.values) == 2
    vlm.patch_vlm(model, thresholds)
    pixels = processor.image_processor(images=photos, return_tensors="pt")
    images = vlm.qwen.qwen_images(model, pixels["pixel_values"], pixels["image_grid_thw"], thresholds.values)
    kept = sum(len(im.features) for im in images) / sum(len(im.mapping) for im in images)
    assert 0.35 <= kept <= 0.65, kept
    assert all(im.extras is not None for im in images)


def video_inputs(processor, dtype=torch.float64) -> dict:
    """A still clip and a random one (4 frames each: 2 time steps), each frame's placeholders a
    run of their own after its textual timestamp, as Qwen3-VL's processor writes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    still = np.repeat((rng.random((1, 64, 96, 3)) * 255).astype(np.uint8), 4, 0)
    busy = (rng.random((4, 64, 96, 3)) * 255).astype(np.uint8)
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                              "text": q}]}], add_generation_prompt=True)
               for q in ("what is in the picture ?", "describe the colors of this photo please")]
    out = dict(processor(videos=[still, busy], text=prompts, return_tensors="pt", padding=True))
    out["pixel_values_videos"] = out["pixel_values_videos"].to(dtype)
    return out


@pytest.mark.parametrize("mode", ["vtu", "compact"])
def test_videos_with_no_merging_generate_what_vanilla_generates(mode: str) -> None:
    model, processor = tiny_qwen3(torch.float64)
    inputs = video_inputs(processor)
    ids = inputs["input_ids"][0]
    starts = (ids == model.config.video_token_id).long().diff().eq(1).sum()
    assert int(starts) >= 2  # the frames' placeholders come in several runs
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=2, output_scores=True, return_dict_in_generate=True)
    vanilla = model.generate(**inputs, **kw)
    vlm.patch_vlm(model, None, mode=mode)
    ours = model.generate(**inputs, **kw)
    assert torch.equal(ours.sequences, vanilla.sequences)
    assert torch.allclose(ours.sequences_scores, vanilla.sequences_scores, atol=1e-10, rtol=0)


def test_merged_videos_decode_from_the_kept_cache_as_recomputed_and_merge_across_time() -> None:
    """With merging, cached greedy decoding equals recomputing every step (fp64 model; generate's
    logits are float32, so 1e-6); merging across
    time leaves the still clip one time step's tokens and changes no virtual length."""
    model, processor = tiny_qwen3(torch.float64)
    inputs = video_inputs(processor)
    vlm.patch_vlm(model, [0.0] * 2)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=processor.tokenizer.all_special_ids)  # no placeholder among the answers
    per_step = [(a["image_tokens"], a["image_positions"]) for a in model.dymu_vlm.last]
    mask = inputs["attention_mask"]
    for step, logits in enumerate(out.logits):
        ids = out.sequences[:, :inputs["input_ids"].shape[1] + step]
        full = torch.cat([mask, torch.ones((2, step), dtype=mask.dtype)], 1)
        fresh = model(**{**inputs, "input_ids": ids, "attention_mask": full}, use_cache=False).logits[:, -1]
        fresh = fresh.to(logits.dtype)  # generate hands out float32 logits
        assert torch.allclose(logits, fresh, atol=1e-6, rtol=0), (step, float((logits - fresh).abs().max()))
    vlm.patch_vlm(model, [0.0] * 2, temporal=-1.0)  # every neighbouring pair merges across time
    model(**inputs)
    across = [(a["image_tokens"], a["image_positions"]) for a in model.dymu_vlm.last]
    grid = inputs["video_grid_thw"][0].tolist()
    assert across[0][0] == per_step[0][0] // grid[0]  # the still clip: one time step's tokens
    assert [a[1] for a in across] == [a[1] for a in per_step] and across[1][0] < per_step[1][0]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_each_photo_gives_the_same_tokens_alone_and_in_a_batch(family: str) -> None:
    """fp64, photos of different sizes (no exact ties): an image's compact tokens, mapping and
    DeepStack features are the same encoded alone and in a padded batch of the rounds."""
    from tiny_models import tiny_qwen

    model, processor = tiny_qwen3(torch.float64) if family == "qwen3" else tiny_qwen("2.5", torch.float64)
    photos = [p.resize(size) for p, size in zip(sample_photos(["rocket", "chelsea", "coffee"]).values(),
                                                 [(128, 96), (96, 160), (112, 112)])]
    pixels = processor.image_processor(images=photos, return_tensors="pt")
    values, grids = pixels["pixel_values"].to(torch.float64), pixels["image_grid_thw"]
    together = vlm.qwen.qwen_images(model, values, grids, [0.0] * 3)
    rows = grids.prod(-1).tolist()
    for i, (image, part) in enumerate(zip(together, values.split(rows))):
        alone = vlm.qwen.qwen_images(model, part, grids[i:i + 1], [0.0] * 3)[0]
        assert torch.equal(alone.mapping, image.mapping) and len(alone.features) < len(alone.mapping)
        assert torch.allclose(alone.features, image.features, atol=1e-12, rtol=0)
        assert (alone.extras is None) == (family != "qwen3")
        if alone.extras is not None:
            assert torch.allclose(alone.extras, image.extras, atol=1e-12, rtol=0)
