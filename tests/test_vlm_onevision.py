"""DyMU in HF LLaVA-OneVision on a tiny random-init model: AnyRes crops through the batched
DToMe tower, the vanilla OneVision layout (unpadding + newlines) as the virtual sequence."""

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from dymu_viz import sample_photos, vlm
from tiny_models import (TINY_VLM_TEXT, TINY_VLM_VISION, check_causal_and_cached_decode,
                         check_unmerged_is_vanilla, tiny_vlm, video_beside_image)

VOCAB, IMAGE = 100, 99
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def tiny_onevision(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TINY_VLM_VISION), text_config=Qwen2Config(**TINY_VLM_TEXT, vocab_size=VOCAB),
        image_token_id=IMAGE, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(cfg).to(dtype).eval()
    model.config.vision_config._attn_implementation = "sdpa"
    return model


def inputs(model, sizes, seed=0):
    """Random crops for images of the given (H, W), and prompts with as many placeholders as
    vanilla OneVision produces for each image (text before and after)."""
    g = torch.Generator().manual_seed(seed)
    image_sizes = torch.tensor(sizes)
    pixels = torch.randn(len(sizes), 5, 3, 56, 56, generator=g, dtype=torch.float64)
    pixels[0] = 0.2  # a flat image
    feats = model.model.get_image_features(pixel_values=pixels, image_sizes=image_sizes, vision_feature_layer=-1,
                                           vision_feature_select_strategy="full").pooler_output
    rows = [torch.cat([torch.randint(0, IMAGE, (3 + b,), generator=g), torch.full((len(f),), IMAGE),
                       torch.randint(0, IMAGE, (4,), generator=g)]) for b, f in enumerate(feats)]
    L = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):], mask[b, L - len(r):] = r, 1
    return ids, mask, pixels, image_sizes, [len(f) for f in feats]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# anyres_max_1: a 2 x 2 tile grid holds four tiles' worth of tokens, so OneVision shrinks it
# bilinearly (8 x 8 -> 4 x 4 for a square image): every slot blends grid tokens
CASES = [("anyres_max_9", (56, 100)), ("anyres_max_9", (100, 56)), ("anyres_max_9", (112, 112)),
         ("anyres_max_9", (40, 40)), ("anyres_max_1", (112, 112)), ("anyres_max_1", (100, 112)),
         ("anyres_max_1", (112, 70))]


@pytest.mark.parametrize("aspect,size", CASES)
def test_no_merging_equals_vanilla_onevision(aspect, size):
    model = tiny_onevision()
    model.config.vision_aspect_ratio = aspect
    ids, mask, pixels, image_sizes, lens = inputs(model, [size])
    ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=image_sizes).logits
    vlm.patch_vlm(model, thresholds=float("inf"))
    out, (acc,) = vlm.logits(model, ids, pixels, mask, image_sizes=image_sizes)
    assert acc["image_positions"] == lens[0] == acc["llm_virtual_length"] - 7
    assert torch.allclose(out, ref, atol=1e-10, rtol=0)  # every position, image positions too


def test_merged_crops_batch_matches_each_alone_and_generates():
    model = tiny_onevision()
    ids, mask, pixels, image_sizes, lens = inputs(model, [(56, 100), (112, 112), (100, 56)])
    vlm.patch_vlm(model, thresholds=0.3)
    batched, accounting = vlm.logits(model, ids, pixels, mask, image_sizes=image_sizes)
    assert accounting[0]["image_tokens"] < lens[0]  # the flat image merged
    for acc, n_crops in zip(accounting, (3, 5, 3)):  # base + 1 x 2, 2 x 2, 2 x 1 tiles
        assert len(acc["crop_tokens"]) == n_crops and acc["encoder_tokens"] == sum(acc["crop_tokens"])
        assert all(0 < n <= 16 for n in acc["crop_tokens"])
    for b in range(3):
        one, acc1 = vlm.logits(model, ids[b:b + 1], pixels[b:b + 1], mask[b:b + 1], image_sizes=image_sizes[b:b + 1])
        assert acc1[0] == accounting[b]
        valid = mask[b].bool()
        assert torch.allclose(batched[b, valid], one[0, valid], atol=1e-8, rtol=0)
    out = vlm.generate(model, ids, pixels, mask, image_sizes=image_sizes, max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    assert out.sequences.shape == (3, 4)
    nxt = batched[:, -1].argmax(-1)
    assert torch.equal(out.sequences[:, 0], nxt)


def test_onevision_needs_image_sizes():
    model = tiny_onevision()
    ids, mask, pixels, image_sizes, _ = inputs(model, [(56, 100)])
    vlm.patch_vlm(model, thresholds=0.3)
    with pytest.raises(ValueError, match="image_sizes"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_downsampled_slots_copy_one_row_or_hold_vanilla_blend():
    """With merging, a downsampled slot is either a pure copy of one compact row (all the grid
    tokens it blends are copies of that row) or a token of its own equal to vanilla's blend of the
    merged tower output; every virtual slot's feature equals vanilla packing of the merged grid."""
    from dymu_viz.vlm.families.onevision import onevision_images
    from dymu_viz.vlm.tower import tower_features

    model = tiny_onevision()
    model.config.vision_aspect_ratio = "anyres_max_1"  # every tile-grid slot blends grid tokens
    _, _, pixels, image_sizes, lens = inputs(model, [(112, 112)])
    vlm.patch_vlm(model, thresholds=0.3)
    image, = onevision_images(model, pixels, image_sizes)
    feats, mapping = image.features, image.mapping
    segments = tower_features(model, pixels[0])
    assert image.crop_tokens == [len(f) for f, _ in segments]
    merged_grid = torch.stack([f[m] for f, m in segments])  # the merged tower output, unmerged
    vanilla, _ = model.model.pack_image_features([merged_grid], image_sizes, image_newline=model.model.image_newline,
                                                 vision_aspect_ratio="anyres_max_1")
    assert mapping.shape == (lens[0],) and torch.allclose(feats[mapping], vanilla[0], atol=1e-12, rtol=0)
    assert torch.equal(mapping.unique(), torch.arange(len(feats)))  # every compact row is used
    assert len(feats) < lens[0]  # the flat image merged: fewer tokens than vanilla
    tiles = mapping[16:]  # after the 4 x 4 base crop: the downsampled tile grid and its newlines
    assert tiles.bincount().max() >= 2  # some grid slots are pure copies of one merged group


# Videos: each frame through the tower, its grid pooled 2 x 2 (bilinear), one newline per video.

def photo():
    return sample_photos(["chelsea"])["chelsea"].resize((56, 56))


def test_video_without_merging_is_vanilla_onevision_logits_and_beams():
    model, processor = tiny_vlm("onevision", patch_size=7)  # 8 x 8 patches a frame, pooled to 4 x 4
    inputs = video_beside_image(processor, photo())
    check_unmerged_is_vanilla(model, inputs)
    video = model.dymu_vlm.last[0]
    assert video["image_positions"] == video["image_tokens"] == 4 * 16 + 1 and video["crop_tokens"] == [64] * 4


def test_merged_video_slots_are_vanilla_pooling_of_the_merged_tower_output():
    """float64: every virtual slot of a merged video holds what vanilla OneVision computes from the
    merged tower output (each patch standing for its token): projector, 2 x 2 bilinear pooling,
    the newline last. Only slots whose 2 x 2 sources lie inside one merged token copy it (the
    others are blends of their own), so the video needs fewer tokens only where merged tokens
    cover whole blocks; identical frames merge alike; cached decoding equals recomputation."""
    from dymu_viz.vlm.families.onevision import onevision_videos
    from dymu_viz.vlm.tower import tower_output

    # 6 blocks: deep enough that merged tokens cover whole 2 x 2 blocks (with 3, none does)
    model, processor = tiny_vlm("onevision", torch.float64, patch_size=7, vision_layers=6)
    inputs = video_beside_image(processor, photo(), torch.float64)
    vlm.patch_vlm(model, 0.5)
    frames = inputs["pixel_values_videos"][0]
    (tokens,) = onevision_videos(model, frames[None])
    hidden, groups, _ = tower_output(model, frames)
    merged = hidden.gather(1, groups[..., None].expand(-1, -1, hidden.shape[-1]))  # (frames, 64, C)
    pooled = model.model.apply_pooling(model.model.multi_modal_projector(merged)).flatten(0, 1)
    expected = torch.cat([pooled, model.model.image_newline[None]])
    assert torch.allclose(tokens.features[tokens.mapping], expected, atol=1e-12, rtol=0)
    assert len(tokens.features) < len(tokens.mapping) == 4 * 16 + 1
    model(**inputs)
    video, image = model.dymu_vlm.last
    assert video["image_tokens"] == len(tokens.features) and video["image_positions"] == 4 * 16 + 1
    frames_tokens = video["crop_tokens"]
    assert frames_tokens[0] == frames_tokens[1] and frames_tokens[2] == frames_tokens[3] < 64
    assert image["image_tokens"] <= image["image_positions"]
    model.float()  # generate hands back float32 logits
    check_causal_and_cached_decode(model, {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
