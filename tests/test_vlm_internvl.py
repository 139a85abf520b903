"""InternVL3's own parts, on tiny random models of its real classes (the family contract -- no
merging = vanilla for greedy / beams / sampling, cached turns, copies -- is in
test_family_contract.py, for both placements):

* the tiles' units equal HF's ``get_image_features`` (every feature layer), and the InternViT
  adapter with merging off equals HF's tower;
* "tower" placement: a compact unit is exactly vanilla's unit computed on the merged tower's
  output with every patch standing for its token; "rounds": merged units are size-weighted means;
* VTU: a one-layer LLM's attention equals the scatter-mean of vanilla attention over duplicated
  units (fp64, 1e-10), text rows exact, in both placements;
* an image gives the same tokens alone and in a batch; per-tile counts in the accounting;
* calibration (rounds, and the tower's layers through ``dymu_viz.calibrate``), ``load_vlm`` ids,
  matched-budget baselines, clear errors.
"""

from __future__ import annotations

import pytest
import torch

import dymu_viz
from dymu_viz import sample_photos, shapes_image, vlm
from dymu_viz.patch import encode, get_state, patch, unpatch
from dymu_viz.thresholds import Thresholds
from dymu_viz.vlm.baselines import match_budget, mean_image_tokens
from dymu_viz.vlm.families import internvl
from dymu_viz.vlm.tower import tower_output
from tiny_models import (check_causal_and_cached_decode, check_unmerged_is_vanilla, tiny_internvl,
                         video_beside_image)

pytestmark = pytest.mark.usefixtures("no_grad")
PLACEMENTS = {"rounds": [0.0] * 3, "tower": 0.3}


def pictures() -> list:
    """A flat image (merges a lot), a wide and a tall photo (different tile counts)."""
    photos = sample_photos(["rocket", "chelsea"])
    return [shapes_image(0, size=120), photos["rocket"].resize((150, 60)), photos["chelsea"].resize((60, 130))]


def inputs_of(processor, images: list, dtype=torch.float64) -> dict:
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                              "text": "describe the picture"}]}], add_generation_prompt=True)
               for _ in images]
    out = dict(processor(images=[[im] for im in images], text=prompts, return_tensors="pt", padding=True))
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@pytest.mark.parametrize("layer", [-1, -2])
def test_tile_units_equal_hf_image_features_and_the_adapter_equals_hf_tower(layer: int) -> None:
    model, processor = tiny_internvl(torch.float64)
    model.config.vision_feature_layer = layer
    tiles = inputs_of(processor, pictures())["pixel_values"]
    vanilla = model.model.get_image_features(pixel_values=tiles).pooler_output
    assert torch.allclose(internvl.vision_units(model, tiles), vanilla, atol=1e-12, rtol=0)
    tower = model.model.vision_tower
    hf = tower(pixel_values=tiles).last_hidden_state
    patch(tower, float("inf"))
    assert torch.allclose(tower(pixel_values=tiles).last_hidden_state, hf, atol=1e-10, rtol=0)
    unpatch(tower)
    vlm.patch_vlm(model, float("inf"))  # "tower" placement merging nothing: vanilla units, one per slot
    tokens = internvl.tower_tokens(model, tiles)
    assert all(torch.equal(rows, torch.arange(len(rows))) for _, rows in tokens)
    assert torch.allclose(torch.stack([t for t, _ in tokens]), vanilla, atol=1e-10, rtol=0)


def test_internvit_6b_layout_q_k_and_rms_norms_and_a_final_norm() -> None:
    """The InternViT-6B layout of InternVL3-38B / 78B: RMS norms, q / k RMS norms over the whole
    width (random weights, so they matter), no mean pooling (the final norm applies). Merging
    nothing, the DToMe tower and the units equal HF's (fp64); merging, the tower placement's units
    are vanilla units of the merged tower output, and the rounds' keys are the k-normed keys."""
    six_b = dict(use_qk_norm=True, norm_type="rms_norm", use_mean_pooling=False)
    model, processor = tiny_internvl(torch.float64, vision_overrides=six_b)
    tower = model.model.vision_tower
    for name, weight in tower.named_parameters():
        if "norm" in name and "layernorm" not in name:  # q_norm / k_norm
            weight.data.uniform_(0.5, 1.5)
    tiles = inputs_of(processor, pictures())["pixel_values"]
    vanilla = model.model.get_image_features(pixel_values=tiles).pooler_output
    assert torch.allclose(internvl.vision_units(model, tiles), vanilla, atol=1e-12, rtol=0)
    hf = tower(pixel_values=tiles).last_hidden_state
    patch(tower, float("inf"))
    assert torch.allclose(tower(pixel_values=tiles).last_hidden_state, hf, atol=1e-10, rtol=0)
    unpatch(tower)
    vlm.patch_vlm(model, 0.3)
    result = encode(tower, tiles)
    expanded = result.tokens.gather(1, result.groups[..., None].expand(-1, -1, result.tokens.shape[-1]))
    normed = tower.layernorm(expanded)  # vision_feature_layer -1 without mean pooling: the final norm
    shuffled = model.model.pixel_shuffle(normed[:, 1:].reshape(len(tiles), 8, 8, -1), scale_factor=0.5)
    vanilla_units = model.model.multi_modal_projector(shuffled.reshape(len(tiles), 16, -1))
    tokens = internvl.tower_tokens(model, tiles)
    assert all(torch.allclose(compact[rows], vanilla_units[t], atol=1e-12, rtol=0)
               for t, (compact, rows) in enumerate(tokens))
    assert sum(len(compact) for compact, _ in tokens) < 16 * len(tiles)
    layer = tower.encoder.layer[-1].attention
    with internvl._keys_of(tower, [len(tower.encoder.layer) - 1]) as keys:
        hidden = tower.embeddings(tiles)
        for block in tower.encoder.layer[:-1]:
            hidden = block(hidden)
        tower.encoder.layer[-1](hidden)
    expected = layer.k_norm(layer.k_proj(tower.encoder.layer[-1].layernorm_before(hidden)))
    assert torch.allclose(keys[len(tower.encoder.layer) - 1], expected.unflatten(-1, (2, -1)).mean(-2), atol=1e-12)
    vlm.patch_vlm(model, [0.0] * 3)
    out = model.generate(**inputs_of(processor, pictures(), torch.float64), max_new_tokens=3, num_beams=2,
                         do_sample=False)
    assert out.shape[0] == 3 and all(a["image_tokens"] < a["image_positions"] for a in model.dymu_vlm.last)


def test_video_frames_are_items_no_merging_is_vanilla_and_merging_decodes_exactly() -> None:
    """A video beside an image in a padded batch. Merging nothing: vanilla's logits (1e-5) and
    beam search tokens. Merging (rounds, and inside the tower): each frame merges on its own, so
    identical frames keep the same number of tokens, and cached decoding equals recomputation."""
    model, processor = tiny_internvl()
    inputs = video_beside_image(processor, pictures()[1])
    check_unmerged_is_vanilla(model, inputs)
    for placement in PLACEMENTS.values():
        vlm.patch_vlm(model, placement)
        model(**inputs)
        video, image = model.dymu_vlm.last
        frames = video["crop_tokens"]
        assert len(frames) == 4 and frames[0] == frames[1] and frames[2] == frames[3]
        assert video["image_positions"] == 4 * 16 and video["image_tokens"] == sum(frames) < 4 * 16
        assert image["image_tokens"] <= image["image_positions"]
        check_causal_and_cached_decode(model, inputs)


def test_tower_placement_units_are_vanilla_units_of_the_merged_tower_output() -> None:
    """Every patch stands for the tower token it ended in; HF's own pixel shuffle and projector
    on that grid give, at every unit, the compact token the unit maps to."""
    model, processor = tiny_internvl(torch.float64)
    tiles = inputs_of(processor, pictures())["pixel_values"]
    vlm.patch_vlm(model, 0.3)
    result = encode(model.model.vision_tower, tiles)
    expanded = result.tokens.gather(1, result.groups[..., None].expand(-1, -1, result.tokens.shape[-1]))
    grid = expanded[:, 1:].reshape(len(tiles), 8, 8, -1)
    shuffled = model.model.pixel_shuffle(grid, scale_factor=0.5)
    vanilla_units = model.model.multi_modal_projector(shuffled.reshape(len(tiles), 16, -1))
    tokens = internvl.tower_tokens(model, tiles)
    merged = 0
    for t, (compact, rows) in enumerate(tokens):
        assert torch.allclose(compact[rows], vanilla_units[t], atol=1e-12, rtol=0)
        assert len(torch.unique(rows)) == len(compact)  # every compact token stands somewhere
        merged += 16 - len(compact)
    assert merged > 0


def test_rounds_merge_units_into_size_weighted_means_of_vanilla_units() -> None:
    model, processor = tiny_internvl(torch.float64)
    tiles = inputs_of(processor, pictures())["pixel_values"]
    vanilla = model.model.get_image_features(pixel_values=tiles).pooler_output
    tokens = internvl.round_tokens(model, tiles, [0.0] * 3, "keys")
    for t, (compact, rows) in enumerate(tokens):
        sizes = torch.bincount(rows, minlength=len(compact)).to(compact)
        sums = torch.zeros_like(compact).index_add_(0, rows, vanilla[t])
        assert torch.allclose(compact, sums / sizes[:, None], atol=1e-12, rtol=0)
    assert sum(len(c) for c, _ in tokens) < 16 * len(tiles)


def test_hooked_keys_are_the_last_blocks_keys_of_each_units_patches() -> None:
    model, processor = tiny_internvl(torch.float64)
    tiles = inputs_of(processor, pictures()[:1])["pixel_values"]
    _, metric = internvl.tile_units(model, tiles, "keys")
    tower = model.model.vision_tower
    hidden = tower.embeddings(tiles)
    for block in tower.encoder.layer[:-1]:
        hidden = block(hidden)
    attn = tower.encoder.layer[-1].attention
    keys = attn.k_proj(tower.encoder.layer[-1].layernorm_before(hidden)).unflatten(-1, (2, -1)).mean(-2)[:, 1:]
    patches = internvl.unit_patches(model, tiles.device)  # (16, 4) raster patches of each unit
    assert patches.shape == (16, 4) and sorted(patches.flatten().tolist()) == list(range(64))
    assert all(len({(p // 8) // 2 * 8 + (p % 8) // 2 for p in unit.tolist()}) == 1 for unit in patches)  # 2 x 2 blocks
    assert torch.allclose(metric, keys[:, patches].flatten(-2), atol=1e-12, rtol=0)


def test_tile_unit_maps_put_every_unit_on_its_tiles_grid() -> None:
    """A unit's place on the map is its 2 x 2 block of patches: with the mapping set to each
    unit's own index (HF's order), the map holds, at every grid cell, the unit of that block."""
    model, _ = tiny_internvl()
    patches = internvl.unit_patches(model, torch.device("cpu"))
    image = vlm.tokens.ImageTokens(torch.zeros(32, 1), torch.arange(32), [16, 16])
    maps = internvl.tile_unit_maps(model, image)
    assert maps.shape == (2, 4, 4) and torch.equal(maps[1], maps[0] + 16)
    for r in range(4):
        for c in range(4):
            assert 2 * r * 8 + 2 * c in patches[maps[0, r, c]].tolist()  # the block's top-left patch is the unit's


def _compact_rows(model, inputs: dict, images: list) -> torch.Tensor:
    media = {model.config.image_token_id: ("image", "<IMG_CONTEXT>", images, False)}
    return vlm.pipeline.compact_chunk(model, inputs["input_ids"], inputs["attention_mask"], media).rows


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("kernel", ["sdpa", "exact"])
def test_one_layer_vtu_attention_is_the_scatter_mean_of_vanilla_attention(placement: str, kernel: str) -> None:
    """fp64, a left-padded batch of images with different tile counts: vanilla runs on the
    duplicated units (every placeholder holds its compact token); VTU's attention output at a
    compact row is the mean of vanilla's at its copies, and text rows' logits are vanilla's."""
    model, processor = tiny_internvl(torch.float64, text_layers=1)
    inputs = inputs_of(processor, pictures())
    vlm.patch_vlm(model, PLACEMENTS[placement], kernel=kernel)
    images = internvl.internvl_items(model, model.dymu_vlm.settings, inputs)
    assert sum(len(im.features) for im in images) < sum(len(im.mapping) for im in images)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
    is_image = inputs["input_ids"] == model.config.image_token_id
    embeds[is_image] = torch.cat([im.features[im.mapping] for im in images])
    attn = model.model.language_model.layers[0].self_attn
    seen = []
    hook = attn.register_forward_hook(lambda m, a, out: seen.append(out[0]))
    out = model(**inputs)
    vlm.unpatch_vlm(model)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    reference = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)
    hook.remove()
    vtu_attn, vanilla_attn = seen
    rows = _compact_rows(model, inputs, images)
    for b in range(len(mask)):
        valid = mask[b].bool()
        r = rows[b][valid]
        mean = torch.zeros(vtu_attn.shape[1:], dtype=torch.float64).index_add_(0, r, vanilla_attn[b][valid])
        mean /= torch.bincount(r, minlength=vtu_attn.shape[1]).clamp_min(1)[:, None].to(mean)
        used = torch.unique(r)
        assert torch.allclose(vtu_attn[b][used], mean[used], atol=1e-10, rtol=0)
    text = mask.bool() & ~is_image
    assert torch.allclose(out.logits[text], model.lm_head(reference.last_hidden_state)[text], atol=1e-10, rtol=0)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_each_image_gives_the_same_tokens_alone_and_in_a_batch(placement: str) -> None:
    """Photos (no exact ties: a flat image's equal scores may pair differently at rounding level)."""
    model, processor = tiny_internvl(torch.float64)
    vlm.patch_vlm(model, PLACEMENTS[placement])
    photos = pictures()[1:] + [sample_photos(["coffee"])["coffee"].resize((100, 100))]
    together = internvl.internvl_items(model, model.dymu_vlm.settings, inputs_of(processor, photos))
    for image, picture in zip(together, photos):
        alone = internvl.internvl_items(model, model.dymu_vlm.settings, inputs_of(processor, [picture]))[0]
        assert torch.equal(alone.mapping, image.mapping) and alone.crop_tokens == image.crop_tokens
        assert torch.allclose(alone.features, image.features, atol=1e-12, rtol=0)
    out = model.generate(**inputs_of(processor, photos), max_new_tokens=2, do_sample=False)
    accounting = model.dymu_vlm.last
    for acc, image in zip(accounting, together):
        assert acc["crop_tokens"] == image.crop_tokens and len(acc["crop_tokens"]) > 1  # tiles + thumbnail
        assert acc["image_positions"] == 16 * len(acc["crop_tokens"]) and acc["image_tokens"] == sum(acc["crop_tokens"])
        assert placement == "tower" or acc["image_tokens"] < acc["image_positions"]
    assert out.shape[0] == 3


def test_calibrated_rounds_keep_about_the_asked_share_and_patch_vlm_follows_them() -> None:
    model, processor = tiny_internvl()
    photos = list(sample_photos().values())
    thresholds = model_family().calibrate_rounds(model, processor, photos, 0.5, 2, 3, progress=False)
    assert thresholds.metadata["kind"] == vlm.qwen.ROUNDS_KIND and len(thresholds.values) == 2
    vlm.patch_vlm(model, thresholds)
    assert model.dymu_vlm.settings.placement == "rounds" and model.dymu_vlm.unit_thresholds == thresholds.values
    assert mean_image_tokens(model, processor, photos) / (16 * 5) == pytest.approx(0.5, abs=0.15)
    with pytest.raises(ValueError, match="window= is for Qwen-VL"):
        model_family().calibrate_rounds(model, processor, photos, 0.5, 2, 3, window=4)


def test_calibrate_rounds_cli_writes_thresholds_patch_vlm_follows(tmp_path, capsys) -> None:
    from dymu_viz import cli

    model, processor = tiny_internvl()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    for name, photo in sample_photos().items():
        photo.save(tmp_path / f"{name}.png")
    out = tmp_path / "rounds.json"
    assert cli.main(["calibrate-rounds", "--model", str(tmp_path / "model"), "--folder", str(tmp_path), "--keep",
                     "0.5", "--rounds", "2", "--batch-size", "3", "--out", str(out), "--quiet"]) == 0
    thresholds = Thresholds.load(out)
    assert thresholds.metadata["kind"] == vlm.qwen.ROUNDS_KIND and thresholds.metadata["n_images"] == 9
    vlm.patch_vlm(model, thresholds)
    assert model.dymu_vlm.settings.placement == "rounds" and model.dymu_vlm.unit_thresholds == thresholds.values
    assert cli.main(["calibrate-rounds", "--model", str(tmp_path / "model"), "--folder", str(tmp_path), "--keep",
                     "0.5", "--window", "4", "--out", str(tmp_path / "w.json"), "--quiet"]) == 2
    assert "error: window= is for Qwen-VL" in capsys.readouterr().err  # refused clearly, nothing written
    assert not (tmp_path / "w.json").exists()


def model_family():
    return vlm.FAMILIES["internvl"]


def test_tower_thresholds_are_calibrated_on_tiles_with_the_encoder_calibration(tmp_path) -> None:
    """``dymu_viz.calibrate`` on the InternViT tower (tiles of the model's own size and
    normalisation) gives per-layer thresholds; patch_vlm then merges inside the tower."""
    from torchvision import transforms

    model, processor = tiny_internvl()
    paths = []
    for name, photo in sample_photos().items():
        paths.append(tmp_path / f"{name}.png")
        photo.save(paths[-1])
    tile = transforms.Compose([transforms.Resize((56, 56)), transforms.ToTensor(),
                               transforms.Normalize(internvl.IMAGENET_MEAN, internvl.IMAGENET_STD)])
    thresholds = dymu_viz.calibrate(model.model.vision_tower, paths, tile, r_total=30, batch_size=2, workers=0,
                                    progress_bar=False)
    assert len(thresholds.values) == 3 and sum(thresholds.r) == 30
    unpatch(model.model.vision_tower)
    vlm.patch_vlm(model, Thresholds.from_dict(thresholds.to_dict()))
    assert model.dymu_vlm.settings.placement == "tower"
    assert mean_image_tokens(model, processor, list(sample_photos().values())) < 16 * 5
    vlm.patch_vlm(model, [0.5, 0.5])  # back to rounds: the tower is unpatched
    assert get_state(model.model.vision_tower) is None


@pytest.mark.parametrize("kind", ["tome", "pool", "random"])
def test_matched_budget_baselines_on_the_units_reach_dymus_mean(kind: str) -> None:
    model, processor = tiny_internvl()
    photos = [p.resize((112, 84)) for p in sample_photos().values()]
    vlm.patch_vlm(model, [0.2] * 2)
    target = mean_image_tokens(model, processor, photos)
    baseline = match_budget(model, processor, photos, target, kind)
    # the tiny tiles' 4 x 4 unit grid pools to 16, 12, 9, 6, 4 ... tokens: coarse steps
    assert baseline.measured == pytest.approx(target, rel=0.25 if kind == "pool" else 0.1)
    settings = model.dymu_vlm.settings
    assert settings.placement == "rounds" and settings.reduction == baseline and settings.rounds is None
    out = vlm.chat(model, processor, photos[:2], ["what ?", "and here ?"], max_new_tokens=2)
    for acc in out.accounting:  # the same count in every tile: the baselines ignore the content
        assert len(set(acc["crop_tokens"])) == 1 and acc["image_tokens"] < acc["image_positions"]


def test_unit_baselines_pool_the_tiles_grid_and_prune_at_random_by_the_tiles_pixels() -> None:
    """Pool(2, 2): each token is the mean of a 2 x 2 block of the tile's 4 x 4 unit grid;
    RandomPrune: kept units keep their own features, and a tile keeps the same units alone."""
    from dymu_viz.vlm.baselines import Pool, RandomPrune

    model, processor = tiny_internvl(torch.float64)
    tiles = inputs_of(processor, pictures())["pixel_values"]
    vanilla = model.model.get_image_features(pixel_values=tiles).pooler_output
    maps = internvl.tile_unit_maps(model, vlm.tokens.ImageTokens(torch.zeros(16, 1), torch.arange(16), [16]))[0]
    for t, (tokens, rows) in enumerate(internvl.round_tokens(model, tiles, None, "keys", Pool(2, 2))):
        for cell in range(4):
            block = maps[cell // 2 * 2:cell // 2 * 2 + 2, cell % 2 * 2:cell % 2 * 2 + 2].flatten()  # HF unit indices
            assert torch.equal(rows[block], torch.full((4,), cell))
            assert torch.allclose(tokens[cell], vanilla[t, block].mean(0), atol=1e-12, rtol=0)
    together = internvl.round_tokens(model, tiles, None, "keys", RandomPrune(5, seed=3))
    alone = internvl.round_tokens(model, tiles[2:3], None, "keys", RandomPrune(5, seed=3))
    assert torch.equal(together[2][1], alone[0][1])
    for t, (tokens, rows) in enumerate(together):
        assert len(tokens) == 5 and all(any(torch.equal(tok, u) for u in vanilla[t]) for tok in tokens)


@pytest.mark.parametrize("model_id", list(internvl.InternVL.checkpoints))
def test_load_vlm_builds_the_real_tower_width_and_runs_dymu(model_id: str) -> None:
    torch.manual_seed(0)
    loaded = vlm.load_vlm(model_id, "random", "cpu", vision_layers=2)
    vision = loaded.model.config.vision_config
    assert (vision.hidden_size, tuple(vision.patch_size), vision.num_hidden_layers) == (1024, (14, 14), 2)
    assert loaded.weights.startswith("RANDOM init (asked for): InternVLForConditionalGeneration")
    image = sample_photos(["rocket"])["rocket"].resize((448, 224))
    vlm.patch_vlm(loaded.model, [0.5] * 2)
    out = vlm.chat(loaded.model, loaded.processor, [image], ["what is in the picture ?"], max_new_tokens=2)
    acc = out.accounting[0]
    assert acc["image_positions"] == 256 * 3 and acc["image_tokens"] <= acc["image_positions"]  # 2 tiles + thumbnail


def test_clear_errors() -> None:
    model, processor = tiny_internvl()
    with pytest.raises(ValueError, match="temporal apply to Qwen-VL"):
        vlm.patch_vlm(model, [0.5], temporal=0.9)
    with pytest.raises(ValueError, match="metric= sets the rounds"):
        vlm.patch_vlm(model, 0.5, metric="features")
    with pytest.raises(ValueError, match="unknown unit metric"):
        vlm.patch_vlm(model, [0.5], metric="values")
    inputs = inputs_of(processor, pictures()[:2], torch.float32)
    vlm.patch_vlm(model, [0.5])
    with pytest.raises(ValueError, match="give one image per <IMG_CONTEXT>"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:-1]})
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(NotImplementedError, match="strategy 'default'"):
        vlm.patch_vlm(model, [0.5])


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_bf16_merged_logits_and_beams(placement: str) -> None:
    """The user's bf16 path: the processor's output, merged, then beam search (3 beams, 2
    returned) on the bf16 model. Rounds: logits within bf16's reach of fp32 (0.02). Tower: the
    merges are decided on the tower's bf16 keys, so a pair whose similarity is within bf16's
    rounding of a threshold can go the other way (the merging itself averages in fp32): the same
    counts per image, the same groups for all but a few patches, and wherever the groups agree,
    the tower's tokens within bf16's reach of fp32's."""
    from tiny_models import check_half_precision

    model, processor = tiny_internvl()
    vlm.patch_vlm(model, PLACEMENTS[placement])
    inputs = inputs_of(processor, pictures(), torch.float32)
    if placement == "rounds":
        check_half_precision(model, inputs, torch.bfloat16)
    else:
        counts = [acc["image_tokens"] for acc in (model(**inputs), model.dymu_vlm.last)[1]]
        full, groups, _ = tower_output(model, inputs["pixel_values"])
        model.to(torch.bfloat16)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        assert torch.isfinite(model(**inputs).logits).all()
        assert [acc["image_tokens"] for acc in model.dymu_vlm.last] == counts
        half, half_groups, _ = tower_output(model, inputs["pixel_values"])
        assert float((half_groups != groups).float().mean()) < 0.02  # 7 of 780 positions here (12 tiles)
        same = (half_groups == groups).all(1)  # tiles merged alike
        assert same.sum() >= len(same) - 2
        scale = float(full[same].abs().max())
        assert float((half[same].float() - full[same]).abs().max()) < 0.02 * scale  # 0.006 here; 0.15 on the others
    out = model.generate(**inputs, max_new_tokens=3, num_beams=3, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 6 and all(acc["image_tokens"] <= acc["image_positions"] for acc in model.dymu_vlm.last)
