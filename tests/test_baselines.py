"""Matched-budget baselines (``dymu_viz.vlm.baselines``) on tiny random LLaVA-1.5 and
LLaVA-OneVision with 7 px patches (an 8 x 8 grid per crop): pooling equals ``avg_pool2d`` of the
tower output, ToMe gives every crop one count, random pruning keeps its drawn patches' own
features (seeded, batch-invariant), identity settings equal the unpatched model in every mode,
and the budget search lands within 5 % of a DyMU run's mean count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dymu_viz import sample_photos, vlm
from dymu_viz.eval import task_docs
from dymu_viz.vlm.baselines import (Pool, RandomPrune, ToMe, image_token_counts, match_budget, mean_image_tokens,
                                    pool_grids, pool_groups, random_keep, size_classes, size_key, tome_r)
from dymu_viz.vlm.reductions import crop_seed
from dymu_viz.vlm.tokens import ImageTokens
from tiny_models import (VLM_QUESTIONS, check_causal_and_cached_decode, encode_images, tiny_internvl, tiny_qwen, tiny_qwen3,
                         tiny_vlm)

FAMILIES = ["llava", "onevision"]
pytestmark = pytest.mark.usefixtures("no_grad")


def photos() -> list:
    return list(sample_photos().values())


def task_images() -> list:
    """The pictures of the offline lmms-eval task's questions, in order (a photo asked about twice counts twice)."""
    photos_by_name = sample_photos()
    return [photos_by_name[doc["image"]] for doc in task_docs()]


def prompts(processor, n: int) -> dict:
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                           add_generation_prompt=True) for q in VLM_QUESTIONS[:n]]
    return dict(processor(images=photos()[:n], text=texts, return_tensors="pt", padding=True))


def tower_output(model, pixel_values):
    """The unpatched tower's hidden state at vision_feature_layer, patches only: (B, 8, 8, C)."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
    patches = hidden[:, 1:] if model.config.vision_feature_select_strategy == "default" else hidden
    return patches.reshape(len(hidden), 8, 8, -1)


@pytest.mark.parametrize("cells", [4, 2])
def test_pooled_features_equal_avg_pool2d_of_the_tower_output(cells: int) -> None:
    model, processor = tiny_vlm("llava", patch_size=7)
    pixels = processor.image_processor(images=photos()[:3], return_tensors="pt")["pixel_values"]
    grid = tower_output(model, pixels).permute(0, 3, 1, 2)  # (B, C, 8, 8)
    expected = model.model.multi_modal_projector(F.avg_pool2d(grid, 8 // cells).flatten(2).transpose(1, 2))
    vlm.patch_vlm(model, Pool(cells, cells))
    tokens = encode_images(model, pixel_values=pixels)
    for b, image in enumerate(tokens):
        assert torch.allclose(image.features, expected[b], atol=1e-5, rtol=0)
        assert torch.equal(image.mapping, pool_groups(8, cells, cells, torch.device("cpu")))


def test_uneven_pooling_cells_and_the_grid_list() -> None:
    assert pool_groups(8, 3, 3, torch.device("cpu")).view(8, 8)[:, 0].tolist() == [0, 0, 0, 3, 3, 3, 6, 6]
    assert torch.bincount(pool_groups(8, 3, 3, torch.device("cpu"))).tolist() == [9, 9, 6, 9, 9, 6, 6, 6, 4]
    grids = pool_grids(24)
    counts = [r * c for r, c in grids]
    assert grids[0] == (24, 24) and grids[-1] == (1, 1) and counts == sorted(counts, reverse=True)
    assert all(max(r, c) <= 1.5 * min(r, c) or abs(r - c) <= 1 for r, c in grids)
    assert tome_r(7, 2, 3) == (4, 3, 0) and sum(tome_r(100, 23, 24)) == 100


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["vtu", "compact"])
def test_identity_baselines_equal_the_unpatched_model(family: str, mode: str) -> None:
    """One patch per cell, or r = 0: the baselines' path with nothing merged is vanilla HF."""
    model, processor = tiny_vlm(family, patch_size=7)
    inputs = prompts(processor, 3)
    reference = model(**inputs).logits
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2)
    tokens, beam_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False), model.generate(**inputs, **beams)
    valid = inputs["attention_mask"].bool()
    for baseline in (Pool(8, 8), ToMe((0, 0, 0)), RandomPrune(64, seed=5)):
        vlm.patch_vlm(model, baseline, mode=mode)
        assert (model(**inputs).logits - reference)[valid].abs().max() <= 1e-5, baseline
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens), baseline
        assert torch.equal(model.generate(**inputs, **beams), beam_tokens), baseline


@pytest.mark.parametrize("family", FAMILIES)
def test_baselines_generate_with_their_counts_in_the_accounting(family: str) -> None:
    model, processor = tiny_vlm(family, patch_size=7)
    inputs = prompts(processor, 3)
    vlm.patch_vlm(model, ToMe(tome_r(20, model.config.vision_feature_layer % 4, 3)))
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    crops = [a["crop_tokens"] for a in model.dymu_vlm.last]
    assert all(count == 64 - 20 for per_image in crops for count in per_image)  # one count for every crop
    vlm.patch_vlm(model, Pool(3, 4), mode="compact")
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert all(count == 12 for a in model.dymu_vlm.last for count in a["crop_tokens"])
    images = encode_images(model, pixel_values=inputs["pixel_values"], image_sizes=inputs.get("image_sizes"))
    assert [a["image_tokens"] for a in model.dymu_vlm.last] == [len(t.features) for t in images]


@pytest.mark.parametrize("family", FAMILIES)
def test_matched_budget_lands_within_five_percent_of_dymu(family: str) -> None:
    model, processor = tiny_vlm(family, patch_size=7)
    vlm.patch_vlm(model, 0.9)
    images = task_images()
    target = mean_image_tokens(model, processor, images)
    assert 0.3 < target / mean_tokens_unmerged(model, processor) < 0.9  # DyMU merged, not everything
    for kind in ("tome", "pool", "random"):
        baseline = match_budget(model, processor, images, target, kind, mode="compact")
        assert abs(baseline.measured / target - 1) <= 0.05, (kind, baseline)
        assert model.dymu_vlm.mode == "compact" and mean_image_tokens(model, processor, images) == baseline.measured


def mean_tokens_unmerged(model, processor) -> float:
    vlm.patch_vlm(model, None)
    unmerged = mean_image_tokens(model, processor, photos())
    vlm.patch_vlm(model, 0.9)
    return unmerged


def test_clear_errors() -> None:
    model, processor = tiny_vlm("llava", patch_size=7)
    with pytest.raises(ValueError, match="cannot pool a 8 x 8 patch grid to 9 x 9"):
        vlm.patch_vlm(model, Pool(9, 9))
    with pytest.raises(ValueError, match="unknown baseline"):
        match_budget(model, processor, photos()[:1], 10, "prune")
    with pytest.raises(ValueError, match="random pruning keeps 1 to 64 of a 8 x 8 patch grid, got 65"):
        vlm.patch_vlm(model, RandomPrune(65))
    with pytest.raises(ValueError, match="merges nothing"):
        match_budget(model, processor, photos()[:1], 10, "pool", mode="full")
    qwen, _ = tiny_qwen("2.5")
    for baseline in (Pool(2, 2), RandomPrune(4)):
        with pytest.raises(ValueError, match="temporal= and window= do not apply"):
            vlm.patch_vlm(qwen, baseline, window=4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["vtu", "compact"])
def test_merging_baselines_are_causal_in_a_padded_batch(family: str, mode: str) -> None:
    model, processor = tiny_vlm(family, patch_size=7)
    inputs = prompts(processor, 3)
    assert (inputs["attention_mask"] == 0).any()
    for baseline in (Pool(2, 2), ToMe(tome_r(30, model.config.vision_feature_layer % 4, 3)), RandomPrune(20)):
        vlm.patch_vlm(model, baseline, mode=mode)
        check_causal_and_cached_decode(model, inputs)


def test_random_pruning_keeps_the_drawn_patches_own_features() -> None:
    """Each crop keeps ``keep`` patches drawn from its seed and pixels, with their own projected
    features; every patch position goes to a nearest kept patch (the earliest of equals)."""
    model, processor = tiny_vlm("llava", patch_size=7)
    pixels = processor.image_processor(images=photos()[:3], return_tensors="pt")["pixel_values"]
    patches = tower_output(model, pixels).flatten(1, 2)  # (B, 64, C)
    vlm.patch_vlm(model, RandomPrune(20, seed=3))
    rows, cols = torch.arange(64) // 8, torch.arange(64) % 8
    for b, image in enumerate(encode_images(model, pixel_values=pixels)):
        kept, parts = random_keep(8, 20, crop_seed(3, pixels[b]), torch.device("cpu"))
        assert len(kept) == 20 and torch.equal(kept, kept.unique())
        assert torch.equal(parts[kept], torch.arange(20))  # a kept patch is its own part
        expected = ImageTokens(model.model.multi_modal_projector(patches[b, kept]), parts, [20]).in_slot_order()
        assert torch.allclose(image.features, expected.features, atol=1e-5, rtol=0)
        assert torch.equal(image.mapping, expected.mapping)
        distance = (rows[:, None] - rows[kept]) ** 2 + (cols[:, None] - cols[kept]) ** 2  # (64, 20)
        nearest = distance.min(1).values
        assert torch.equal(distance.gather(1, parts[:, None]).squeeze(1), nearest)
        earlier = (distance == nearest[:, None]).float().argmax(1)  # the first kept patch at the least distance
        assert torch.equal(parts, earlier)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_pruning_is_seeded_and_batch_invariant(family: str) -> None:
    """The same seed draws the same patches (same tokens, same answers); another seed draws
    others; an image draws the same patches alone as in a batch."""
    model, processor = tiny_vlm(family, patch_size=7)
    inputs = prompts(processor, 3)
    extra = {k: inputs[k] for k in ("image_sizes",) if k in inputs}

    def draw(seed: int, **arguments) -> list:
        vlm.patch_vlm(model, RandomPrune(20, seed=seed), mode="compact")
        return encode_images(model, **arguments)

    first, again, other = (draw(seed, pixel_values=inputs["pixel_values"], **extra) for seed in (1, 1, 2))
    assert all(torch.equal(a.mapping, b.mapping) and torch.equal(a.features, b.features) for a, b in zip(first, again))
    assert any(not torch.equal(a.mapping, b.mapping) for a, b in zip(first, other))
    alone = draw(1, pixel_values=inputs["pixel_values"][1:2], **{k: v[1:2] for k, v in extra.items()})[0]
    assert torch.equal(alone.mapping, first[1].mapping)
    assert torch.allclose(alone.features, first[1].features, atol=1e-5, rtol=0)
    vlm.patch_vlm(model, RandomPrune(20, seed=1))
    answers = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    vlm.patch_vlm(model, RandomPrune(20, seed=1))
    assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), answers)
    crops = [a["crop_tokens"] for a in model.dymu_vlm.last]
    assert all(count == 20 for per_image in crops for count in per_image)


@pytest.mark.slow
def test_tome_r_is_r_in_every_layer_llava_reads_the_papers_tome_row() -> None:
    """``tome=21`` (lmms-eval) is ToMe with r = 21 in each of the 23 CLIP-L/14-336 blocks LLaVA-1.5
    reads: 577 - 23 * 21 = 94 tokens with CLS, as in the paper's ToMe row (93 image tokens, CLS
    dropped). Per-layer values still set each layer, the rest merging nothing."""
    from dymu_viz.eval.harness import parse_setting

    torch.manual_seed(0)
    loaded = vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", "cpu")  # the real 24-block tower
    model, processor = loaded.model, loaded.processor
    setting = parse_setting("llava", None, "21", None)
    assert setting == ToMe((21,))
    vlm.patch_vlm(model, setting, mode="compact")
    assert mean_image_tokens(model, processor, photos()[:1]) == 93
    counts = model.model.vision_tower.dymu.last.counts[0].tolist()
    assert counts[-1] == 94 and counts == [577 - 21 * i for i in range(24)]
    vlm.patch_vlm(model, parse_setting("llava", None, "21/5", None), mode="compact")
    assert mean_image_tokens(model, processor, photos()[:1]) == 576 - 26


# Families that merge in rounds after their tower: the baselines reduce each image's units.
ROUND_FAMILIES = {"qwen2_5_vl": lambda dtype=torch.float32: tiny_qwen("2.5", dtype),
                  "qwen3_vl": lambda dtype=torch.float32: tiny_qwen3(dtype)}


@pytest.mark.parametrize("family", ROUND_FAMILIES)
@pytest.mark.parametrize("kind", ["tome", "pool", "random"])
def test_unit_baselines_of_round_families_reach_dymus_mean(family: str, kind: str) -> None:
    model, processor = ROUND_FAMILIES[family]()
    pictures = [p.resize((168, 112)) for p in sample_photos().values()]
    vlm.patch_vlm(model, [0.3] * 2)
    target = mean_image_tokens(model, processor, pictures)
    baseline = match_budget(model, processor, pictures, target, kind)
    assert baseline.measured == pytest.approx(target, rel=0.15)
    assert model.dymu_vlm.settings.reduction == baseline and model.dymu_vlm.unit_thresholds is None
    out = vlm.chat(model, processor, pictures[:2], ["what ?", "and here ?"], max_new_tokens=2)
    assert [acc["image_tokens"] for acc in out.accounting] == [round(baseline.measured)] * 2 or kind == "tome"
    assert all(acc["image_tokens"] < acc["image_positions"] for acc in out.accounting)


@pytest.mark.parametrize("family", ROUND_FAMILIES)
def test_unit_baselines_are_means_of_units_and_deepstack_alike(family: str) -> None:
    """Pool: every token is the mean of its cell's units (and of their DeepStack features); ToMe:
    every image loses exactly its r merges, whatever it shows; RandomPrune: kept units keep
    their own features, the same alone as in a batch."""
    model, processor = ROUND_FAMILIES[family](torch.float64)
    pictures = [p.resize((168, 112)) for p in sample_photos(["rocket", "chelsea", "coffee"]).values()]
    pixels = processor.image_processor(images=pictures, return_tensors="pt")
    values, grids = pixels["pixel_values"].to(torch.float64), pixels["image_grid_thw"]
    vanilla = model.model.get_image_features(values, grids)
    units = vanilla.pooler_output
    for image, unit in zip(vlm.qwen.qwen_images(model, values, grids, reduction=Pool(2, 2)), units):
        sizes = torch.bincount(image.mapping, minlength=4).to(unit)
        assert len(image.features) == 4
        means = torch.zeros(4, unit.shape[1], dtype=unit.dtype).index_add_(0, image.mapping, unit) / sizes[:, None]
        assert torch.allclose(image.features, means, atol=1e-12, rtol=0)
        if image.extras is not None:  # Qwen3-VL: DeepStack pooled with the same cells
            assert image.extras.shape[:2] == (4, len(model.config.vision_config.deepstack_visual_indexes))
    for image, unit in zip(vlm.qwen.qwen_images(model, values, grids, reduction=ToMe((3, 2))), units):
        assert len(image.features) == len(unit) - 5
    together = vlm.qwen.qwen_images(model, values, grids, reduction=RandomPrune(5, seed=1))
    first_rows = int(grids[0].prod())
    alone = vlm.qwen.qwen_images(model, values[:first_rows], grids[:1], reduction=RandomPrune(5, seed=1))[0]
    assert torch.equal(alone.mapping, together[0].mapping) and torch.allclose(alone.features, together[0].features)
    for image, unit in zip(together, units):
        assert len(image.features) == 5 and all(any(torch.equal(f, u) for u in unit) for f in image.features)


SIZE_FAMILIES = {"llava": lambda: tiny_vlm("llava", patch_size=7), "onevision": lambda: tiny_vlm("onevision", patch_size=7),
                 **ROUND_FAMILIES, "internvl": tiny_internvl}


@pytest.mark.parametrize("family", SIZE_FAMILIES)
def test_the_budget_search_measures_one_image_per_size_only_where_counts_ignore_pixels(family: str) -> None:
    """match_budget measures one image of each processed size where the family says a baseline's
    count ignores the pixels: there every image of a size gets its size's count, and the measured
    mean equals the mean over all images. OneVision's unpadding makes counts depend on the pixels,
    so it measures every image."""
    model, processor = SIZE_FAMILIES[family]()
    sizes = [(168, 112), (112, 112), (112, 168)]
    pictures = [p.resize(sizes[i % 3]) for i, p in enumerate(sample_photos().values())]
    classes = size_classes(processor, pictures)
    assert sum(n for _, n in classes) == len(pictures) and 1 <= len(classes) <= 3
    vlm.patch_vlm(model, [0.3] * 2 if vlm.family_of(model).rounds else 0.9)
    target = mean_image_tokens(model, processor, pictures)
    by_size = vlm.family_of(model).baseline_counts_by_size
    assert by_size == (family != "onevision")
    for kind in ("tome", "pool", "random"):
        baseline = match_budget(model, processor, pictures, target, kind)
        counts = image_token_counts(model, processor, pictures)
        assert baseline.measured == sum(counts) / len(counts), kind
        keys = [size_key(processor, p) for p in pictures]
        per_size = {key: {c for c, k in zip(counts, keys) if k == key} for key in keys}
        uniform = all(len(c) == 1 for c in per_size.values())
        assert uniform or not by_size, kind
        if family == "onevision" and kind == "random":  # why OneVision measures every image
            assert not uniform
