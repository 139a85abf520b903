"""Every official threshold checkpoint of the reference (dymu-spec.md sections 3.1, 3.3, 4.1, 4.2)
loads onto the towers users combine it with.

Each file is written here in the reference's own layout (``{"name", "state_dict"}``, DDP
``module.`` prefix, 0-dim bf16 buffers, the 1.0 "never merged" placeholder on layers whose r is
0, unrelated weights around them). The per-layer schedule read from its name must be the one
the spec tabulates, and it must patch every tower of its depth, open_clip / timm and HF, and the
HF LLaVA towers: LLaVA-1.5 reads layer -2 (the 24th threshold is unused), LLaVA-OneVision's
tower is SO400M without its last layer (27 thresholds -> the first 26, mapped with a warning)."""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from torch import nn

import dymu_viz
from dymu_viz import Thresholds, vlm
from dymu_viz.vlm.tower import tower_features
from tiny_models import TINY_VLM_TEXT, TINY_VLM_VISION, make_hf_clip, make_hf_siglip, make_open_clip, make_timm_map

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels

OPENAI = "module.visual.transformer.resblocks.{}.threshold"
TIMM = "module.visual.trunk.blocks.{}.threshold"
HF = "module.vision_model.encoder.layers.{}.threshold"

# dymu-spec.md section 3.1 (schedule table) and 4.1 / 4.2 (config names)
L14_192_LINEAR = [32, 30, 29, 28, 26, 25, 24, 22, 21, 20, 18, 17, 16, 14, 13, 12, 10, 9, 8, 6, 4, 0, 0, 0]
OFFICIAL: dict[str, tuple[str, list[int]]] = {
    "ViT-L-14-336-tome-72out": (OPENAI, [21] * 24),
    "ViT-L-14-336-tome-72out-linear": (OPENAI, [42, 40, 38, 36, 35, 33, 31, 29, 28, 26, 24, 22, 21, 19, 17, 15,
                                                14, 12, 10, 8, 4, 0, 0, 0]),
    "ViT-L-14-336-tome-192out": (OPENAI, [16] * 24),
    "ViT-L-14-336-tome-192out-linear": (OPENAI, L14_192_LINEAR),
    "ViT-L-14-336-tome-192out-reverse-linear": (OPENAI, L14_192_LINEAR[::-1]),
    "ViT-L-14-336-tome-384out": (OPENAI, [8] * 24),
    "ViT-L-14-336-tome-480out": (OPENAI, [4] * 24),
    "ViT-L-14-336-tome-nomerge": (OPENAI, [0] * 24),
    "ViT-B-16-SigLIP-384-tome-72out": (TIMM, [42] * 12),
    "ViT-B-16-SigLIP-384-tome-72out-linear": (TIMM, [84, 77, 70, 63, 56, 49, 42, 35, 28, 0, 0, 0]),
    "ViT-B-16-SigLIP-384-tome-192out": (TIMM, [32] * 12),
    "ViT-B-16-SigLIP-384-tome-384out": (TIMM, [16] * 12),
    "ViT-B-16-SigLIP-384-tome-480out": (TIMM, [8] * 12),
    "ViT-B-16-SigLIP-384-tome-no-merge": (TIMM, [0] * 12),
    "ViT-SO400M-14-SigLIP-384-tome-192out": (TIMM, [20] * 24 + [19] * 3),
    "google/siglip-so400m-patch14-384-81out": (HF, [24] * 27),
}
# the two SigLIP-B names the spec lists without a registered timm model: same rule, r_total 384
UNTABULATED = {"ViT-B-16-SigLIP-384-tome-192out-linear": "linear",
               "ViT-B-16-SigLIP-384-tome-192out-reverse-linear": "reverse_linear"}


def tiny_llava(vision_layers: int) -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**{**TINY_VLM_VISION, "num_hidden_layers": vision_layers}),
                      text_config=LlamaConfig(**TINY_VLM_TEXT, vocab_size=100), image_token_id=99,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_onevision(vision_layers: int = 26) -> nn.Module:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**{**TINY_VLM_VISION, "num_hidden_layers": vision_layers}),
        text_config=Qwen2Config(**TINY_VLM_TEXT, vocab_size=100), image_token_id=99,
        image_grid_pinpoints=[[56, 56]], vision_feature_layer=-1, vision_feature_select_strategy="full")
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def small(make: Callable[..., nn.Module], layers: int) -> nn.Module:
    """The family's tower at the real depth, with a tiny width and image (fast)."""
    return make(layers=layers, hidden=32, heads=2, image=56, patch=14) if make in (make_hf_clip, make_hf_siglip) \
        else make(layers=layers, hidden=32, heads=2, image=64, patch=16)


# file layout -> towers of its depth that users patch with it
TOWERS = {OPENAI: [make_open_clip, make_hf_clip], TIMM: [make_timm_map, make_hf_siglip], HF: [make_hf_siglip]}


def write_reference_file(path, name: str, key: str, r: list[int]) -> list[float]:
    """The reference's layout; returns the threshold values written (bf16-exact)."""
    values = [1.0 if r_i == 0 else (64 + (7 * i) % 60) / 256 for i, r_i in enumerate(r)]  # low: they merge
    state = {"module.visual.conv1.weight": torch.randn(4, 3, 2, 2), "module.logit_scale": torch.tensor(4.6)}
    state.update({key.format(i): torch.tensor(v, dtype=torch.bfloat16) for i, v in enumerate(values)})
    state["module.text_projection"] = torch.randn(4, 4)
    torch.save({"name": name, "state_dict": state}, path)
    return values


@pytest.mark.parametrize("name", list(OFFICIAL))
@torch.no_grad()
def test_official_checkpoint_loads_with_its_schedule_onto_its_towers(tmp_path, name: str) -> None:
    key, r = OFFICIAL[name]
    values = write_reference_file(tmp_path / "t.pth", name, key, r)
    t = Thresholds.load(tmp_path / "t.pth")
    assert t.values == values and t.r == r and t.model == name
    for make in TOWERS[key]:
        tower = small(make, len(r))
        dymu_viz.patch(tower, t)
        assert tower.dymu.thresholds == values and tower.dymu.r == r
        size = 56 if make in (make_hf_clip, make_hf_siglip) else 64
        result = dymu_viz.encode(tower, torch.randn(2, 3, size, size))
        counts = result.counts[0].tolist()
        for i, r_i in enumerate(r):
            if r_i == 0:  # a layer the schedule switches off never merges, whatever its threshold
                assert counts[i + 1] == counts[i], (name, i)
        assert (counts[-1] < counts[0]) == any(r), counts  # the active layers do merge


@pytest.mark.parametrize("name", list(UNTABULATED))
def test_untabulated_siglip_schedules_follow_the_rule(tmp_path, name: str) -> None:
    from dymu_viz.schedule import make_schedule
    r = make_schedule(576 - 192, 12, UNTABULATED[name])
    write_reference_file(tmp_path / "t.pth", name, TIMM, r)
    t = Thresholds.load(tmp_path / "t.pth")
    assert t.r == r and t.schedule == UNTABULATED[name] and sum(t.r) == 384


@pytest.mark.parametrize("name", [n for n in OFFICIAL if n.startswith("ViT-L-14-336")])
@torch.no_grad()
def test_clip_l_files_on_llava_1_5_use_23_layers(tmp_path, name: str) -> None:
    """LLaVA-1.5 reads layer -2: the tower runs 23 blocks, the 24th threshold is never used."""
    key, r = OFFICIAL[name]
    write_reference_file(tmp_path / "t.pth", name, key, r)
    model = tiny_llava(vision_layers=24)
    vlm.patch_vlm(model, Thresholds.load(tmp_path / "t.pth"))
    features = tower_features(model, torch.randn(1, 3, 56, 56))
    assert len(features) == 1
    assert len(model.model.vision_tower.dymu.last.counts[0]) == 24  # input + 23 blocks


@pytest.mark.parametrize("name", ["ViT-SO400M-14-SigLIP-384-tome-192out", "google/siglip-so400m-patch14-384-81out"])
@torch.no_grad()
def test_so400m_files_on_llava_onevision_map_27_to_26_explicitly(tmp_path, name: str) -> None:
    key, r = OFFICIAL[name]
    values = write_reference_file(tmp_path / "t.pth", name, key, r)
    thresholds = Thresholds.load(tmp_path / "t.pth")
    assert thresholds.layers == 27
    model = tiny_onevision(26)
    with pytest.warns(UserWarning, match=r"27-layer thresholds on LLaVA-OneVision's 26-layer tower: layers 0-25"):
        vlm.patch_vlm(model, thresholds)
    state = model.model.vision_tower.dymu
    assert state.thresholds == values[:26] and state.r == r[:26]
    # saying it yourself: no warning, the same mapping, recorded in the metadata
    mapped = thresholds.truncated(26)
    assert mapped.metadata["layers_used"] == "0-25 of 27"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlm.patch_vlm(tiny_onevision(26), mapped)
    # the same file on the full 27-layer SO400M tower uses every layer
    tower = small(make_hf_siglip, 27)
    dymu_viz.patch(tower, thresholds)
    assert tower.dymu.thresholds == values


def test_wrong_depth_names_both_depths(tmp_path) -> None:
    key, r = OFFICIAL["ViT-L-14-336-tome-72out"]
    write_reference_file(tmp_path / "t.pth", "ViT-L-14-336-tome-72out", key, r)
    thresholds = Thresholds.load(tmp_path / "t.pth")
    with pytest.raises(ValueError, match=r"have 24 layers but the encoder has 12") as err:
        dymu_viz.patch(small(make_open_clip, 12), thresholds)
    assert ".truncated(12)" in str(err.value)  # a deeper file says how to map it on purpose
    with pytest.raises(ValueError, match=r"have 24 layers but the encoder has 27"):
        dymu_viz.patch(small(make_hf_siglip, 27), thresholds)
    # a 27-layer file on a 25-layer OneVision tower is no known mapping: an error, not a guess
    key, r = OFFICIAL["google/siglip-so400m-patch14-384-81out"]
    write_reference_file(tmp_path / "ov.pth", "google/siglip-so400m-patch14-384-81out", key, r)
    with pytest.raises(ValueError, match=r"have 27 layers but the encoder has 25"):
        vlm.patch_vlm(tiny_onevision(25), Thresholds.load(tmp_path / "ov.pth"))
    with pytest.raises(ValueError, match="cannot keep 30 of 27"):
        Thresholds.load(tmp_path / "ov.pth").truncated(30)
