"""DyMU on Qwen2-VL and Qwen2.5-VL (tiny random models of the exact classes, real processor
classes): DToMe rounds on the units after the PatchMerger, VTU with HF's 3-row M-RoPE
positions, through the model's own ``generate``.

With no merging every mode must be vanilla HF (called with the processor's mm_token_type_ids):
fp32 1e-5. With merging, VTU's defining property is checked where it is exact (a one-layer LLM:
attention = scatter-mean of vanilla attention over the expansion; text rows = vanilla fed the
duplicated features), cached decoding equals recomputation, and 1-D positions are shown wrong.
"""

from __future__ import annotations

import pytest
import torch

import dymu_viz.vlm.forward
from dymu_viz import Thresholds, vlm
from dymu_viz.data import sample_photos, shapes_image
from dymu_viz.merge import merge_tokens
from dymu_viz.vlm.qwen import padded_units, tower_units, unit_rounds
from tiny_models import VLM_QUESTIONS, check_causal_and_cached_decode, check_half_precision, tiny_qwen, tiny_vlm

VERSIONS = ["2", "2.5"]
QUESTIONS = VLM_QUESTIONS
pytestmark = pytest.mark.usefixtures("no_grad")


def photos(n: int) -> list:
    """A flat image (merges a lot) and real photos of three different sizes and aspects."""
    real = sample_photos(["rocket", "grace_hopper", "hubble_deep_field"])
    return [shapes_image(0, size=120), real["rocket"], real["grace_hopper"].crop((0, 0, 300, 600)),
            real["hubble_deep_field"]][:n]


def batch(processor, images_per_prompt=(1, 1, 1), questions=QUESTIONS) -> dict:
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": q}]}],
        add_generation_prompt=True) for n, q in zip(images_per_prompt, questions)]
    pics = photos(sum(images_per_prompt))
    return dict(processor(images=pics or None, text=prompts, return_tensors="pt", padding=True))


def vanilla(model, inputs, **kwargs):
    assert "mm_token_type_ids" in inputs  # without it HF 5.23 silently uses 1-D positions
    return model(**inputs, **kwargs)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", [(1,), (1, 1, 1), (2, 1)], ids=["one", "three_sizes", "two_per_prompt"])
def test_no_merging_is_vanilla_in_every_mode(version: str, attn: str, layout: tuple) -> None:
    model, processor = tiny_qwen(version, attn=attn)
    inputs = batch(processor, layout, QUESTIONS[:len(layout)])
    assert len(set(map(tuple, inputs["image_grid_thw"].tolist()))) == min(sum(layout), 4)  # sizes differ
    ref = vanilla(model, inputs).logits
    valid = inputs["attention_mask"].bool()
    for mode in vlm.MODES:
        vlm.patch_vlm(model, None, mode=mode)
        out = model(**inputs).logits
        assert (out - ref)[valid].abs().max() <= 1e-5, mode
        vlm.unpatch_vlm(model)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kernel", ["sdpa", "eager", "exact"])
@pytest.mark.parametrize("cache", ["compact", "decode_fast"])
def test_vtu_without_merging_generates_vanilla_tokens_and_logits(version: str, kernel: str, cache: str) -> None:
    model, processor = tiny_qwen(version)
    inputs = batch(processor)
    ref = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    vlm.patch_vlm(model, None, kernel=kernel, cache=cache)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-5
    values = out.past_key_values.layers[0].values.shape[-2]
    assert values == inputs["input_ids"].shape[1] + 7  # compact entries: with no merging, every token once


def merged(version: str, text_layers: int = 2, dtype=torch.float32, **kwargs):
    model, processor = tiny_qwen(version, dtype=dtype, text_layers=text_layers, **kwargs)
    inputs = batch(processor)
    vlm.patch_vlm(model, [0.0] * 3)  # random weights: low thresholds to merge a lot
    return model, processor, inputs


@pytest.mark.parametrize("version", VERSIONS)
def test_merging_reduces_tokens_per_image_with_the_virtual_length_kept(version: str) -> None:
    model, _, inputs = merged(version)
    model(**inputs)
    acc = model.dymu_vlm.last
    units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert [a["image_positions"] for a in acc] == units
    assert [a["crop_tokens"] for a in acc] == [[u] for u in units]
    assert all(a["image_tokens"] < a["image_positions"] for a in acc)
    assert acc[0]["image_tokens"] <= 2  # the flat image
    valid = inputs["attention_mask"].sum(-1).tolist()
    assert [a["llm_virtual_length"] for a in acc] == valid
    assert [a["llm_compact_length"] for a in acc] == [v - a["image_positions"] + a["image_tokens"]
                                                      for v, a in zip(valid, acc)]


def _expanded_inputs(model, inputs):
    """Vanilla's view of the merged images: every unit's placeholder embedding replaced by its
    compact feature (so copies are identical), with HF's own 3-D positions."""
    state = model.dymu_vlm
    images = vlm.qwen.qwen_images(model, inputs["pixel_values"], inputs["image_grid_thw"], state.unit_thresholds)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
    is_image = inputs["input_ids"] == model.config.image_token_id
    embeds[is_image] = torch.cat([im.features[im.mapping] for im in images])
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                        attention_mask=inputs["attention_mask"])
    return embeds, pos, images


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kernel", ["sdpa", "eager", "exact"])
def test_one_layer_vtu_attention_is_the_scatter_mean_of_vanilla_and_text_rows_are_exact(version, kernel) -> None:
    # eager: HF's eager softmax runs in float32, so vanilla runs eager too
    model, processor, inputs = merged(version, text_layers=1, dtype=torch.float64,
                                      attn="eager" if kernel == "eager" else "sdpa")
    vlm.patch_vlm(model, [0.0] * 3, kernel=kernel)
    embeds, pos, images = _expanded_inputs(model, inputs)
    attn = model.model.language_model.layers[0].self_attn
    seen = []
    hook = attn.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    vlm.unpatch_vlm(model)
    mask = inputs["attention_mask"]
    ref_h = model.model.language_model(inputs_embeds=embeds, position_ids=pos, attention_mask=mask).last_hidden_state
    vlm.patch_vlm(model, [0.0] * 3, kernel=kernel)
    out = model(**inputs)
    hook.remove()
    vanilla_attn, vtu_attn = seen
    # the compact row standing at every input position: scatter-mean of vanilla's copies
    rows = _compact_rows(model, inputs, images)
    for b in range(mask.shape[0]):
        valid = mask[b].bool()
        r = rows[b][valid]
        mean = torch.zeros(vtu_attn.shape[1], vtu_attn.shape[2], dtype=torch.float64).index_add_(0, r, vanilla_attn[b][valid])
        mean /= torch.bincount(r, minlength=vtu_attn.shape[1]).clamp_min(1)[:, None].to(mean)
        used = torch.unique(r)
        assert torch.allclose(vtu_attn[b][used], mean[used], atol=1e-10, rtol=0), float((vtu_attn[b][used] - mean[used]).abs().max())
    text = mask.bool() & (inputs["input_ids"] != model.config.image_token_id)
    ref_logits = model.lm_head(ref_h)
    assert torch.allclose(out.logits[text], ref_logits[text], atol=1e-10, rtol=0)


def _compact_rows(model, inputs, images):
    """(B, L) compact row of every input position, as the pipeline lays the chunk out."""
    media = {model.config.image_token_id: ("image", "<|image_pad|>", images, False)}
    chunk = vlm.pipeline.compact_chunk(model, inputs["input_ids"], inputs["attention_mask"], media)
    return chunk.rows


@pytest.mark.parametrize("version", VERSIONS)
def test_one_dimensional_virtual_positions_are_wrong_for_qwen(version: str, monkeypatch) -> None:
    """Negative control: the same merged model with 1-D virtual positions (slot order, as for
    LLaVA) gives text rows different from vanilla on the duplicated features."""
    model, processor, inputs = merged(version, text_layers=1, dtype=torch.float64)
    embeds, pos, _ = _expanded_inputs(model, inputs)
    vlm.unpatch_vlm(model)
    mask = inputs["attention_mask"]
    ref = model.lm_head(model.model.language_model(inputs_embeds=embeds, position_ids=pos,
                                                   attention_mask=mask).last_hidden_state)
    vlm.patch_vlm(model, [0.0] * 3)
    text = mask.bool() & (inputs["input_ids"] != model.config.image_token_id)
    assert torch.allclose(model(**inputs).logits[text], ref[text], atol=1e-10, rtol=0)
    monkeypatch.setattr(dymu_viz.vlm.forward, "chunk_rope", lambda *a, **k: None)  # falls back to slot order
    wrong = model(**inputs).logits[text]
    assert (wrong - ref[text]).abs().max() > 1e-3


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cache", ["compact", "decode_fast"])
def test_cached_decode_equals_recomputation_and_continues_at_max_plus_one(version: str, cache: str) -> None:
    from transformers import DynamicCache

    model, _, inputs = merged(version, dtype=torch.float64)
    vlm.patch_vlm(model, [0.0] * 3, cache=cache)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    track = out.past_key_values.dymu.track
    valid = track.layout.valid[:, :-5]  # the last 5 generated tokens were fed as decode steps
    top = torch.where(valid, track.layout.rope_pos[:, :, :-5], -1).amax(dim=(0, 2))
    for step in range(5):  # HF's rule: text after the prompt continues at max + 1
        assert torch.equal(track.layout.rope_pos[:, :, -5 + step], (top + 1 + step)[None].expand(3, -1))
    L = inputs["input_ids"].shape[1]
    new = out.sequences[:, L:]
    cache = DynamicCache(config=model.config.get_text_config())
    step_logits = [model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1]]
    for i in range(5):
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(new[:, :i + 1])], 1)
        step_logits.append(model(input_ids=new[:, i:i + 1], attention_mask=mask, past_key_values=cache).logits[:, -1])
    assert torch.equal(torch.stack(step_logits[:-1], 1).argmax(-1), new[:, :5])  # generate's greedy tokens
    again = model(**{**inputs, "input_ids": out.sequences, "attention_mask": torch.cat(
        [inputs["attention_mask"], torch.ones_like(new)], 1), "mm_token_type_ids": torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)}).logits
    for i, logits in enumerate(step_logits):  # cached decoding = recomputation from scratch
        assert torch.allclose(logits, again[:, L - 1 + i], atol=1e-10, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_compact_mode_puts_each_merged_token_at_its_first_unit(version: str) -> None:
    model, _, inputs = merged(version)
    vlm.patch_vlm(model, [0.0] * 3, mode="compact")
    seen = {}
    rotary = model.model.language_model.rotary_emb
    hook = rotary.register_forward_hook(lambda m, args, out: seen.update(pos=args[1]))
    model(**inputs)
    hook.remove()
    pos = seen["pos"]
    assert pos.shape[0] == 3  # M-RoPE rows handed to the model's own rotary
    acc = model.dymu_vlm.last
    assert pos.shape[2] == max(a["llm_compact_length"] for a in acc)
    full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                         attention_mask=inputs["attention_mask"])
    images = iter(vlm.qwen.qwen_images(model, inputs["pixel_values"], inputs["image_grid_thw"], [0.0] * 3))
    image_id = model.config.image_token_id
    for b, a in enumerate(acc):  # built independently: walk the prompt, text as vanilla, images by first unit
        ids, valid = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        expected, p = [], 0
        while p < len(ids):
            if not valid[p]:
                p += 1
            elif ids[p] != image_id:
                expected.append(full[:, b, p])
                p += 1
            else:
                tokens = next(images)
                first_unit = [int((tokens.mapping == c).nonzero()[0]) for c in range(len(tokens.features))]
                expected += [full[:, b, p + u] for u in first_unit]
                p += len(tokens.mapping)
        n = a["llm_compact_length"]
        assert torch.equal(pos[:, b, -n:], torch.stack(expected, 1))


@pytest.mark.parametrize("version", VERSIONS)
def test_rounds_infinite_threshold_merges_nothing_and_groups_stay_in_their_image(version: str) -> None:
    """Also batch invariance (float64): every unit gets the same feature alone as in the batch.
    The flat image's units are exactly equal, so all its edges tie and which equal units pair up
    follows BLAS rounding of the padded shape; its counts and per-unit features cannot differ,
    and for the photos the groups themselves are identical."""
    model, processor = tiny_qwen(version, dtype=torch.float64)
    inputs = batch(processor)
    x, metric, size = padded_units(tower_units(model, inputs["pixel_values"], inputs["image_grid_thw"]))
    counts = size.sum(-1)
    same, same_size, groups = unit_rounds(x, metric, size, [float("inf")] * 4)
    assert torch.equal(same, x) and torch.equal(same_size, size)
    assert torch.equal(groups, torch.where(size > 0, torch.arange(x.shape[1]), x.shape[1]))
    x2, size2, groups2 = unit_rounds(x, metric, size, [-1.0] * 3)
    for b, n in enumerate(counts.tolist()):
        kept = int((size2[b] > 0).sum())
        assert groups2[b, :n].max() < kept and groups2[b, :n].min() >= 0  # every unit in one of its own rows
        assert torch.equal(torch.bincount(groups2[b, :n], minlength=kept), size2[b, :kept])
        assert (groups2[b, n:] == x2.shape[1]).all()  # padded units: one past the last row
        alone, alone_size, alone_groups = unit_rounds(x[b:b + 1, :n], metric[b:b + 1, :n], size[b:b + 1, :n], [-1.0] * 3)
        assert int((alone_size > 0).sum()) == kept
        assert torch.allclose(alone[0][alone_groups[0]], x2[b][groups2[b, :n]], atol=1e-12, rtol=0)
        if b > 0:  # the photos: no exact ties
            assert torch.equal(alone_groups[0], groups2[b, :n])


def test_merge_tokens_keeps_padded_originals_out_of_every_row() -> None:
    x = torch.randn(2, 6, 4)
    size = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    groups = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 6, 6]])  # image 1 has 3 original tokens
    src = torch.tensor([[True, False, False], [True, False, False]])
    dst, best = torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1.0, 0.5, 0.2], [1.0, 0.3, -torch.inf]])
    x1, size1, groups1 = merge_tokens(x, size, groups, src, dst, best, protected=0)
    assert x1.shape[1] == 5 and (groups1[1, 3:] == 5).all() and groups1[1, :3].max() < 2
    x2, size2, groups2 = merge_tokens(x1, size1, groups1, torch.tensor([[True, False, False], [False, False, False]]),
                                      torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1.0, 0.0, 0.0], [0.1, 0.0, 0.0]]),
                                      protected=0)
    assert (groups2[1, 3:] == x2.shape[1]).all()


@pytest.mark.parametrize("version", VERSIONS)
def test_hooked_metric_equals_the_keys_recomputed_by_hand(version: str) -> None:
    """The metric is the pre-RoPE keys of a full-attention block (the last one; with "blocks",
    each round's own), head-averaged, the unit's four patches concatenated, in raster order: for
    Qwen2.5-VL the block sees the units in window order, which HF undoes after the merger (the
    photo spans several windows)."""
    from transformers.vision_utils import get_vision_window_index

    model, processor = tiny_qwen(version)
    pixels = processor.image_processor(images=[photos(2)[1]], return_tensors="pt")  # rocket: 12 x 18 units
    pv, grid = pixels["pixel_values"], pixels["image_grid_thw"]
    visual = model.model.visual
    assert vlm.qwen.metric_blocks(visual, "keys", 2) == [3]  # the last full-attention block
    assert vlm.qwen.metric_blocks(visual, "blocks", 2) == [1, 3]  # Qwen2.5's fullatt [1, 3]; Qwen2: all 4 full
    seen = {}
    hooks = [visual.blocks[b].register_forward_pre_hook(lambda m, args, b=b: seen.setdefault(b, args[0])) for b in (1, 3)]
    (feats, keys), = tower_units(model, pv, grid)
    (same, blocks), = tower_units(model, pv, grid, metric="blocks", rounds=2)
    for hook in hooks:
        hook.remove()
    by_hand = []
    for b in (1, 3):
        attn = visual.blocks[b].attn
        k = attn.qkv(visual.blocks[b].norm1(seen[b])).view(len(seen[b]), 3, attn.num_heads, -1)[:, 1].mean(1)
        units = k.reshape(-1, 4 * k.shape[-1])  # the block's unit order
        if version == "2.5":
            window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
            assert not torch.equal(window_index, torch.arange(len(units)))  # several windows: the orders differ
            units = units[window_index.argsort()]
        by_hand.append(units)
    vanilla = model.model.get_image_features(pv, grid).pooler_output[0]
    assert torch.equal(feats, vanilla) and torch.equal(same, vanilla)
    assert torch.allclose(keys, by_hand[1], atol=1e-6, rtol=0)
    assert torch.allclose(blocks, torch.cat(by_hand, -1), atol=1e-6, rtol=0)


def test_each_round_of_the_blocks_metric_reads_its_share_of_the_tower() -> None:
    """Real depths: Qwen2.5-VL-7B's full-attention blocks 7, 15, 23, 31; Qwen2-VL's 32 full."""
    from types import SimpleNamespace

    q25 = SimpleNamespace(fullatt_block_indexes=[7, 15, 23, 31], blocks=[None] * 32)
    q2 = SimpleNamespace(blocks=[None] * 32)
    assert vlm.qwen.metric_blocks(q25, "blocks", 4) == vlm.qwen.metric_blocks(q2, "blocks", 4) == [7, 15, 23, 31]
    assert vlm.qwen.metric_blocks(q25, "blocks", 6) == [7, 15, 15, 23, 31, 31]
    assert vlm.qwen.metric_blocks(q25, "blocks", 2) == [15, 31]
    assert vlm.qwen.metric_blocks(q2, "keys", 4) == [31]


def test_blocks_metric_round_k_matches_on_its_own_part() -> None:
    """merge_rounds with views: round k's matching sees only part k of the metric."""
    torch.manual_seed(0)
    x, size = torch.randn(2, 12, 4), torch.ones(2, 12, dtype=torch.long)
    parts = [torch.randn(2, 12, 3) for _ in range(3)]
    seen = []

    def record(k, best, size):
        seen.append(best.clone())
        return torch.zeros_like(best, dtype=torch.bool)  # no merges: every round sees the same rows

    from dymu_viz.merge import bipartite_scores
    from dymu_viz.vlm.qwen import merge_rounds
    merge_rounds(x, torch.cat(parts, -1), size, 3, record, views=3)
    for k, part in enumerate(parts):
        assert torch.allclose(seen[k], bipartite_scores(part, size)[0], atol=1e-6)


@pytest.mark.parametrize("version", VERSIONS)
def test_beam_search_with_several_images_per_prompt_equals_vanilla_with_no_merging(version: str) -> None:
    """generate expands each sample's images (patch rows of different sizes) with its beams."""
    model, processor = tiny_qwen(version)
    inputs = batch(processor, (2, 1), QUESTIONS[:2])
    beams = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2)
    reference = model.generate(**inputs, **beams)
    vlm.patch_vlm(model, None)
    assert torch.equal(model.generate(**inputs, **beams), reference)
    vlm.patch_vlm(model, [0.0] * 3)
    out = vlm.generate(model, **inputs, **beams)
    assert out.sequences.shape == (4, 5)
    units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    assert [a["image_positions"] for a in out.accounting] == [units[0] + units[1]] * 2 + [units[2]] * 2


@pytest.mark.parametrize("version", VERSIONS)
def test_clear_errors(version: str) -> None:
    model, processor = tiny_qwen(version)
    inputs = batch(processor, (1,), QUESTIONS[:1])
    with pytest.raises(ValueError, match="one threshold per DToMe round"):
        vlm.patch_vlm(model, 0.9)
    vlm.patch_vlm(model, [0.5])
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match="video_grid_thw"):
        model(**inputs, pixel_values_videos=torch.zeros(16, 1176))
    with pytest.raises(TypeError, match="expected one of"):
        vlm.patch_vlm(model.model.language_model, [0.5])


@pytest.mark.parametrize("model_id", ["Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2-VL-7B-Instruct"])
def test_load_vlm_builds_the_real_width_tower_offline_and_chat_runs(model_id: str) -> None:
    loaded = vlm.load_vlm(model_id, "random", vision_layers=2, text_width=128)
    assert not loaded.pretrained and loaded.weights.startswith("RANDOM init (asked for)")
    visual = loaded.model.model.visual
    assert len(visual.blocks) == 2 and visual.blocks[0].attn.qkv.in_features == 1280
    if "2.5" in model_id:
        assert visual.fullatt_block_indexes == [1]  # none of the real [7, 15, 23, 31] survive the cut: the last block
    rope = loaded.model.config.get_text_config().rope_parameters["mrope_section"]
    assert sum(rope) == 128 // 2 // 2  # half of the scaled LLM's head dim (2 heads of 64)
    vlm.patch_vlm(loaded.model, [0.8] * 4)
    out = vlm.chat(loaded.model, loaded.processor, [photos(2)[1]], ["what is this ?"], max_new_tokens=3)
    acc = out.accounting[0]
    assert len(out.texts) == 1 and acc["image_tokens"] <= acc["image_positions"]
    assert acc["image_positions"] == acc["crop_tokens"][0]


@pytest.mark.parametrize("batch_size", [4, 2])
def test_calibrated_rounds_keep_the_asked_share_of_units(batch_size: int) -> None:
    """Calibration asks each round to merge a share of the current tokens (Qwen's unit counts
    follow the resolution); inference with the batch-averaged thresholds on the same images keeps
    about that share, fewest on the flat image."""
    from dymu_viz.vlm.qwen import calibrate_rounds

    model, processor = tiny_qwen("2.5")
    images = photos(4)
    thresholds = calibrate_rounds(model, processor, images, keep=0.25, rounds=3, batch_size=batch_size, progress=False)
    assert thresholds.layers == 3 and thresholds.metadata["n_batches"] == 4 // batch_size
    assert thresholds.values == sorted(thresholds.values, reverse=True)  # later rounds: less similar pairs left
    pixels = processor.image_processor(images=images, return_tensors="pt")
    x, metric, size = padded_units(tower_units(model, pixels["pixel_values"], pixels["image_grid_thw"]))
    _, kept, _ = unit_rounds(x, metric, size, thresholds.values)
    per_image = (kept > 0).sum(-1)
    share = float(per_image.sum() / size.sum())
    assert abs(share - 0.25) < (0.01 if batch_size == 4 else 0.05), share  # one batch: the batch rule itself
    assert int(per_image.argmin()) == 0  # the flat image
    vlm.patch_vlm(model, thresholds)
    with pytest.raises(ValueError, match="keep must be between"):
        calibrate_rounds(model, processor, images, keep=0.1, rounds=3)


def calibrate_rounds_cli(tmp_path, args: list[str], port: int, broken: bool = False) -> tuple:
    """``python -m dymu_viz calibrate-rounds`` with ``args`` on four photos of different sizes (and
    a broken file), alone and under torchrun with 2 processes: the two completed processes (each
    writes tmp_path/one.json, two.json); the command line and the repository root, to run again."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    images = tmp_path / "images"
    images.mkdir()
    for k, photo in enumerate(photos(4)):
        photo.convert("RGB").resize((112 + 28 * k, 84 + 14 * k)).save(images / f"{k}.jpg")
    if broken:
        (images / "broken.jpg").write_bytes(b"not an image")
    command = ["calibrate-rounds", "--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--pretrained", "random", "--folder",
               str(images), "--device", "cpu", "--quiet", *args]
    one = subprocess.run([sys.executable, "-m", "dymu_viz", *command, "--out", str(tmp_path / "one.json")],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "-m", "dymu_viz", *command, "--out", str(tmp_path / "two.json")]
    two = subprocess.run(torchrun, capture_output=True, text=True, cwd=root, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return one, two, command, root


def test_calibrate_rounds_cli_two_processes_equal_one_and_skip_broken_images(tmp_path) -> None:
    """`python -m dymu_viz calibrate-rounds` on a folder, alone and under torchrun with 2
    processes: the same thresholds exactly (batches averaged in batch order); a broken file is
    skipped and named."""
    import subprocess
    import sys

    import dymu_viz

    one, _, command, root = calibrate_rounds_cli(tmp_path, ["--vision-layers", "1", "--keep", "0.4", "--rounds", "2",
                                                            "--batch-size", "2", "--metric", "blocks"], 29531,
                                                 broken=True)
    assert "skipped" in one.stdout and "broken.jpg" in one.stdout
    a, b = (dymu_viz.Thresholds.load(tmp_path / f"{n}.json") for n in ("one", "two"))
    assert a.values == b.values and a.r == b.r and a.layers == 2 and a.metadata["metric"] == "blocks"
    assert a.metadata["n_images"] == b.metadata["n_images"] == 4
    assert len(b.metadata["failures"]) == 1
    wrong = subprocess.run([sys.executable, "-m", "dymu_viz", *command, "--out", str(tmp_path / "one.json")],
                           capture_output=True, text=True, cwd=root, timeout=300)
    assert wrong.returncode == 2 and "exists" in wrong.stderr


def test_encoder_thresholds_are_refused_for_qwen_rounds() -> None:
    from dymu_viz import Thresholds

    model, _ = tiny_qwen("2.5")
    with pytest.raises(ValueError, match="calibrated for the layers of a ViT"):
        vlm.patch_vlm(model, Thresholds([0.9] * 24, [8] * 24, model="ViT-L-14-336"))


def test_stale_rope_deltas_never_leak_into_a_patched_call() -> None:
    """HF keeps model.model.rope_deltas from the last vanilla generate (batch 3 here); a patched
    call with another batch computes its own positions and equals a fresh model's vanilla run."""
    model, processor = tiny_qwen("2.5")
    three, two = batch(processor), batch(processor, (1, 1), QUESTIONS[:2])
    fresh = model.generate(**two, max_new_tokens=4, do_sample=False)
    model.generate(**three, max_new_tokens=2, do_sample=False)
    assert model.model.rope_deltas.shape[0] == 3  # stale for any other batch
    vlm.patch_vlm(model, None)
    assert torch.equal(model.generate(**two, max_new_tokens=4, do_sample=False), fresh)


def video_batch(processor) -> dict:
    """Two prompts: a moving video (random frames); an image, then a still video (one frame
    repeated: 3 identical time steps), in one prompt."""
    import numpy as np

    rng = np.random.default_rng(0)
    moving = rng.integers(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    still = np.repeat(rng.integers(0, 255, (1, 84, 112, 3), dtype=np.uint8), 6, 0)
    video, image = {"type": "video"}, {"type": "image"}
    prompts = [processor.apply_chat_template([{"role": "user", "content": content + [{"type": "text", "text": q}]}],
                                             add_generation_prompt=True)
               for content, q in [([video], QUESTIONS[0]), ([image, video], QUESTIONS[1])]]
    return dict(processor(videos=[moving, still], images=photos(2)[1:], text=prompts, return_tensors="pt",
                          padding=True))


@pytest.mark.parametrize("version", VERSIONS)
def test_video_with_no_merging_is_vanilla_in_every_mode_and_with_beams(version: str) -> None:
    model, processor = tiny_qwen(version)
    inputs = video_batch(processor)
    assert inputs["video_grid_thw"][:, 0].tolist() == [2, 3]  # time steps
    ref = vanilla(model, inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    ref_beams = model.generate(**inputs, **beams)
    valid = inputs["attention_mask"].bool()
    for mode in vlm.MODES:
        vlm.patch_vlm(model, None, mode=mode)
        assert (model(**inputs).logits - ref)[valid].abs().max() <= 1e-5, mode
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens), mode
    assert torch.equal(model.generate(**inputs, **beams), ref_beams)  # each sample's video and image together


@pytest.mark.parametrize("version", VERSIONS)
def test_video_time_steps_merge_on_their_own(version: str) -> None:
    """With no temporal threshold merging is within each time step: a still video's identical
    steps merge alike, and no merged token spans two steps."""
    model, processor = tiny_qwen(version)
    inputs = video_batch(processor)
    moving, still = vlm.qwen.qwen_images(model, inputs["pixel_values_videos"], inputs["video_grid_thw"], [0.0] * 3,
                                         video=True)
    for tokens, (t, h, w) in zip((moving, still), inputs["video_grid_thw"].tolist()):
        per_step = tokens.mapping.view(t, -1)  # units of each time step, raster order
        rows = [set(step.tolist()) for step in per_step]
        assert all(not (rows[i] & rows[j]) for i in range(t) for j in range(i))  # no token spans two steps
        assert len(tokens.features) < t * h * w // 4
    counts = [len(set(step.tolist())) for step in still.mapping.view(3, -1)]
    assert counts[0] == counts[1] == counts[2]
    vlm.patch_vlm(model, [0.0] * 3)
    model(**inputs)
    acc = model.dymu_vlm.last
    units = lambda grids: (grids.prod(-1) // 4).tolist()  # noqa: E731
    (moving_units, still_units), (image_units,) = units(inputs["video_grid_thw"]), units(inputs["image_grid_thw"])
    assert [a["image_positions"] for a in acc] == [moving_units, image_units + still_units]
    assert acc[1]["crop_tokens"] == [image_units, still_units]  # in prompt order: the image, then the video


def still_and_moving_videos(processor, steps: int = 5) -> dict:
    """A still video of ``steps`` identical time steps, then a moving one (random frames)."""
    import numpy as np

    rng = np.random.default_rng(1)
    still = np.repeat(rng.integers(0, 255, (1, 84, 112, 3), dtype=np.uint8), 2 * steps, 0)
    moving = rng.integers(0, 255, (2 * steps, 84, 112, 3), dtype=np.uint8)
    return processor.video_processor(videos=[still, moving], return_tensors="pt")


@pytest.mark.parametrize("version", VERSIONS)
def test_merging_across_time_steps_chains_a_still_background_through_every_step(version: str) -> None:
    """Five identical time steps (an odd count: three levels of the pairing tree) collapse into
    the first step's tokens; an infinite temporal threshold is bitwise the per-step result."""
    model, processor = tiny_qwen(version)
    clips = still_and_moving_videos(processor)
    pv, grid = clips["pixel_values_videos"], clips["video_grid_thw"]
    assert grid[:, 0].tolist() == [5, 5]
    per_step = vlm.qwen.qwen_images(model, pv, grid, [0.5] * 2, video=True)
    never = vlm.qwen.qwen_images(model, pv, grid, [0.5] * 2, video=True, temporal=float("inf"))
    for a, b in zip(per_step, never):
        assert torch.equal(a.features, b.features) and torch.equal(a.mapping, b.mapping)
    still, moving = vlm.qwen.qwen_images(model, pv, grid, [0.5] * 2, video=True, temporal=0.99)
    steps = per_step[0].mapping.view(5, -1)
    first_step = len(steps[0].unique())
    assert len(per_step[0].features) == 5 * first_step > first_step > 1
    assert len(still.features) == first_step  # every later step merged into the first
    assert torch.equal(still.mapping.view(5, -1), still.mapping.view(5, -1)[:1].expand(5, -1))
    assert torch.allclose(still.features, per_step[0].features[:first_step], atol=1e-5)  # the same content
    assert len(per_step[1].features) >= len(moving.features)  # random frames: few scores beat 0.99


@pytest.mark.parametrize("version", VERSIONS)
def test_merging_across_time_joins_only_neighbouring_units(version: str) -> None:
    """With no merging inside a step and every allowed edge taken, each token of a 2-step video
    is one unit of step 0 and units of step 1 at most one grid cell away from it."""
    model, processor = tiny_qwen(version)
    inputs = video_batch(processor)
    pv, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
    moving = vlm.qwen.qwen_images(model, pv, grid, [float("inf")], video=True, temporal=-1.0)[0]
    t, h, w = (grid[0] // torch.tensor([1, 2, 2])).tolist()
    assert t == 2
    mapping = moving.mapping.view(t, h * w)
    assert len(moving.features) == h * w and len(mapping[0].unique()) == h * w  # step 0: one unit per token
    for unit, row in enumerate(mapping[1].tolist()):
        anchor = int((mapping[0] == row).nonzero())
        assert abs(anchor // w - unit // w) <= 1 and abs(anchor % w - unit % w) <= 1


@pytest.mark.parametrize("version", VERSIONS)
def test_video_merged_across_time_through_generate(version: str) -> None:
    """patch_vlm(..., temporal=): the still video's three steps reach the LLM as one step's
    tokens at all their positions; cached decode equals recomputation."""
    model, processor = tiny_qwen(version)
    inputs = video_batch(processor)
    separate = vlm.qwen.qwen_images(model, inputs["pixel_values_videos"], inputs["video_grid_thw"], [0.5] * 2,
                                    video=True)[1]
    vlm.patch_vlm(model, [0.5] * 2, temporal=0.99)
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    acc = model.dymu_vlm.last
    image_units, still_units = (inputs["image_grid_thw"].prod(-1) // 4).item(), (inputs["video_grid_thw"][1].prod() // 4).item()
    assert acc[1]["image_positions"] == image_units + still_units
    image = vlm.qwen.qwen_images(model, inputs["pixel_values"], inputs["image_grid_thw"], [0.5] * 2)[0]
    assert acc[1]["image_tokens"] == len(image.features) + len(separate.features) // 3
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, inputs["input_ids"].shape[1]:])], 1)
    full = model(**{**inputs, "input_ids": tokens, "attention_mask": mask}).logits
    cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.allclose(torch.stack(cached.logits, 1)[:, -1], full[:, -2], atol=1e-4)
    with pytest.raises(ValueError, match="temporal"):
        vlm.patch_vlm(tiny_vlm("llava")[0], None, temporal=0.9)


def test_the_rounds_metric_follows_the_calibration_and_is_checked() -> None:
    from dymu_viz.vlm.qwen import calibrate_rounds

    model, processor = tiny_qwen("2.5")
    inputs = batch(processor)
    ref = vanilla(model, inputs).logits
    valid = inputs["attention_mask"].bool()
    for metric in vlm.qwen.METRICS:  # no merging: the metric is never used, vanilla either way
        vlm.patch_vlm(model, None, metric=metric)
        assert (model(**inputs).logits - ref)[valid].abs().max() <= 1e-5
    by_metric = {}
    for metric in ("features", "blocks"):
        by_metric[metric] = calibrated = calibrate_rounds(model, processor, photos(4), keep=0.3, rounds=3, progress=False, metric=metric)
        assert calibrated.metadata["metric"] == metric
        vlm.patch_vlm(model, calibrated)
        assert model.dymu_vlm.unit_metric == metric
        model(**inputs)
        expected = vlm.qwen.qwen_images(model, inputs["pixel_values"], inputs["image_grid_thw"], calibrated.values,
                                        metric=metric)
        assert [a["image_tokens"] for a in model.dymu_vlm.last] == [len(t.features) for t in expected]
    features = by_metric["features"]
    vlm.patch_vlm(model, features.values)  # plain values: the default metric
    assert model.dymu_vlm.unit_metric == "keys"
    units = tower_units(model, inputs["pixel_values"], inputs["image_grid_thw"], metric="features")
    assert all(torch.equal(f, m) for f, m in units)  # the merger's outputs are their own metric
    with pytest.raises(ValueError, match="calibrated with metric='features'"):
        vlm.patch_vlm(model, features, metric="keys")
    with pytest.raises(ValueError, match="unknown unit metric"):
        vlm.patch_vlm(model, [0.5], metric="values")
    llava = vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", vision_layers=1, text_width=64).model
    with pytest.raises(ValueError, match="tower merges on its own keys"):
        vlm.patch_vlm(llava, 0.9, metric="keys")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_finite_and_close_to_fp32(version: str, dtype: torch.dtype) -> None:
    """Measured on these models: max |logit difference| to fp32 with no merging 0.0048 / 0.0061
    (bf16, Qwen2.5-VL / Qwen2-VL) and 0.0008 (fp16), against logits up to 0.67; 0.02 and 0.003
    are asserted. Merged generation stays finite (matching runs in float32 at least)."""
    model, processor = tiny_qwen(version)
    inputs = batch(processor)
    vlm.patch_vlm(model, None)
    check_half_precision(model, inputs, dtype)
    vlm.patch_vlm(model, [0.0] * 3)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert all(a["image_tokens"] < a["image_positions"] for a in model.dymu_vlm.last)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("cache", ["compact", "decode_fast"])
def test_second_chat_turn_with_the_cache_kept_equals_recomputation(version: str, cache: str) -> None:
    """Generate, append the next user turn (chat template text), generate again on the kept
    cache: the same tokens and logits (fp64 1e-10) as generating the whole conversation afresh;
    the new turn's text continues at the first turn's max + 1."""
    model, processor, inputs = merged(version, dtype=torch.float64)
    vlm.patch_vlm(model, [0.0] * 3, cache=cache)
    first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    n = first.sequences.shape[0]
    turn = processor.tokenizer(["<|im_end|>\n<|im_start|>user and the colors ?<|im_end|>\n<|im_start|>assistant\n"] * n,
                               add_special_tokens=False, return_tensors="pt").input_ids
    ids = torch.cat([first.sequences, turn], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["input_ids"].shape[1]:])], 1)
    kw = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    kept = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values, **kw)
    fresh = model.generate(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                           image_grid_thw=inputs["image_grid_thw"], **kw)
    assert torch.equal(kept.sequences, fresh.sequences)
    for a, b in zip(kept.logits, fresh.logits):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert torch.equal(kept.past_key_values.dymu.next_rope, fresh.past_key_values.dymu.next_rope)


def test_calibrated_temporal_threshold_keeps_the_asked_share_and_patch_vlm_applies_it(tmp_path) -> None:
    """calibrate_temporal: on its videos the share of tokens left after merging across time is
    at most ``keep`` and a slightly higher threshold leaves more; the saved thresholds carry it
    into patch_vlm. A share below what neighbouring cells allow is refused."""
    from dymu_viz.vlm.qwen import calibrate_rounds, calibrate_temporal
    from temporal_worker import clips

    model, processor = tiny_qwen("2.5")
    rounds = calibrate_rounds(model, processor, photos(3), keep=0.5, rounds=2, progress=False)
    videos = clips()  # still, a pan, still with noise
    calibrated = calibrate_temporal(model, processor, videos, rounds, keep=0.6, progress=False)
    tau = calibrated.metadata["temporal"]
    assert calibrated.values == rounds.values and -1.0 <= tau < 1.0

    def share(threshold: float) -> float:
        clips = processor.video_processor(videos=videos, return_tensors="pt")
        pv, grid = clips["pixel_values_videos"], clips["video_grid_thw"]
        merged = vlm.qwen.qwen_images(model, pv, grid, rounds.values, video=True, temporal=threshold)
        separate = vlm.qwen.qwen_images(model, pv, grid, rounds.values, video=True)
        return sum(len(t.features) for t in merged) / sum(len(t.features) for t in separate)

    assert 0.45 <= share(tau) <= 0.6 < share(tau + 1e-3)
    calibrated.save(tmp_path / "rounds.json")
    vlm.patch_vlm(model, Thresholds.load(tmp_path / "rounds.json"))
    assert model.dymu_vlm.temporal == tau
    vlm.patch_vlm(model, calibrated, temporal=None)  # None: the calibrated value
    assert model.dymu_vlm.temporal == tau
    with pytest.raises(ValueError, match="cannot be reached"):
        calibrate_temporal(model, processor, videos[:1], rounds, keep=0.05, progress=False)
    everything = calibrate_temporal(model, processor, videos, rounds, keep=1.0, progress=False)
    assert share(everything.metadata["temporal"]) == 1.0  # keep = 1: not even identical steps merge


def test_window_order_regroups_the_grid_block_by_block() -> None:
    order, sizes = vlm.qwen.window_order(5, 7, 3, torch.device("cpu"))
    assert sorted(order.tolist()) == list(range(35)) and sizes == [9, 9, 3, 6, 6, 2]
    blocks = [set((u // 7 // 3, u % 7 // 3) for u in piece.tolist()) for piece in order.split(sizes)]
    assert all(len(b) == 1 for b in blocks) and len(set.union(*blocks)) == 6  # one block each, all different
    assert all(torch.equal(piece, piece.sort().values) for piece in order.split(sizes))  # raster inside a block


@pytest.mark.parametrize("version", VERSIONS)
def test_windowed_rounds_never_merge_across_windows_and_a_wide_window_is_the_whole_image(version: str) -> None:
    model, processor = tiny_qwen(version)
    inputs = batch(processor, (1, 1))  # a flat image and the rocket
    pv, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    whole = vlm.qwen.qwen_images(model, pv, grid, [0.0] * 4)
    wide = vlm.qwen.qwen_images(model, pv, grid, [0.0] * 4, window=100)
    for a, b in zip(whole, wide):
        assert torch.equal(a.features, b.features) and torch.equal(a.mapping, b.mapping)
    windowed = vlm.qwen.qwen_images(model, pv, grid, [0.0] * 4, window=4)
    for tokens, (_, h, w), alone in zip(windowed, (grid // torch.tensor([1, 2, 2])).tolist(), whole):
        unit = torch.arange(h * w)
        block = unit // w // 4 * 100 + unit % w // 4
        for row in range(len(tokens.features)):
            assert len(block[tokens.mapping == row].unique()) == 1  # every token inside one window
        if max(h, w) > 4:  # the rocket: several windows, so merges, but fewer than with none
            assert len(alone.features) < len(tokens.features) < h * w
        else:  # the flat image fits one window: the same groups as with no window
            assert torch.equal(alone.mapping, tokens.mapping)
    assert (grid[1] // 2).tolist()[1:] == [6, 9]  # the rocket: 6 windows of up to 4 x 4 units
    vlm.patch_vlm(model, [0.0] * 4, window=4)
    model(**inputs)
    assert [a["image_tokens"] for a in model.dymu_vlm.last] == [len(t.features) for t in windowed]
    calibrated = vlm.qwen.calibrate_rounds(model, processor, photos(3), keep=0.5, rounds=2, progress=False, window=4)
    assert calibrated.metadata["window"] == 4
    vlm.patch_vlm(model, calibrated)
    assert model.dymu_vlm.window == 4
    with pytest.raises(ValueError, match="calibrated with window=4"):
        vlm.patch_vlm(model, calibrated, window=8)
    with pytest.raises(ValueError, match="at least 2 units"):
        vlm.patch_vlm(model, [0.5], window=1)


def test_calibrate_temporal_under_torchrun_equals_one_process(tmp_path) -> None:
    """Three clips over 2 processes (one encodes two, the other one): the counts are summed, so
    the bisection lands on exactly the same threshold as one process."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    worker = str(here / "temporal_worker.py")
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one.json")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                          worker, str(tmp_path / "two.json")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["temporal"] for n in ("one", "two"))
    assert a == b and -1.0 < a < 1.0


@pytest.mark.parametrize("version", VERSIONS)
def test_a_generated_image_token_is_an_ordinary_token_as_in_hf(version: str) -> None:
    """Vanilla HF embeds a generated <|image_pad|> like any token (no pixels come with it, and
    M-RoPE continues at the next position); the patched model too, in both modes."""
    from tiny_models import forcing_token

    model, processor = tiny_qwen(version)
    inputs = batch(processor)
    length = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=5, do_sample=False, logits_processor=forcing_token(model.config.image_token_id, length + 1))
    reference = model.generate(**inputs, **kw)
    assert (reference[:, length + 1] == model.config.image_token_id).all()
    for mode in ("vtu", "compact"):
        vlm.patch_vlm(model, None, mode=mode)
        assert torch.equal(model.generate(**inputs, **kw), reference), mode


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", ["compact", "vtu"])
def test_merged_padded_batch_is_causal_and_cached_decode_equals_recomputation(version: str, mode: str) -> None:
    model, processor = tiny_qwen(version)
    inputs = batch(processor)  # three image sizes: left padding
    assert (inputs["attention_mask"] == 0).any()
    vlm.patch_vlm(model, [0.5] * 2, mode=mode)
    check_causal_and_cached_decode(model, inputs)
