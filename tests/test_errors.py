"""Bad inputs give clear errors that name the problem (design.md section 3, "Errors"), and a
rejected setting leaves the model as it was."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dymu_viz
from dymu_viz import Thresholds
from tiny_models import make_hf_clip, make_hf_siglip, make_open_clip, make_timm_map


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def assert_unpatched(model: nn.Module) -> None:
    assert not hasattr(model, "dymu")
    assert "forward" not in model.__dict__ and not type(model).__name__.startswith("DyMU")


@pytest.mark.parametrize("factory, depth", [(make_hf_clip, 4), (make_hf_siglip, 4), (make_open_clip, 3),
                                            (make_timm_map, 3)], ids=["hf_clip", "hf_siglip", "open_clip", "timm_map"])
def test_wrong_threshold_count_names_both_numbers_and_does_not_patch(factory, depth) -> None:
    model = factory()
    wrong = depth - 1
    with pytest.raises(ValueError, match=rf"{wrong} thresholds.*{depth} layers"):
        dymu_viz.patch(model, thresholds=[0.5] * wrong)
    assert_unpatched(model)
    with pytest.raises(ValueError, match=rf"{depth + 2} thresholds.*{depth} layers"):
        dymu_viz.patch(model, thresholds=[0.5] * (depth + 2))
    assert_unpatched(model)


def test_wrong_threshold_count_on_a_patched_model_keeps_the_old_settings() -> None:
    model = dymu_viz.patch(make_hf_clip(), thresholds=0.7)
    with pytest.raises(ValueError, match=r"3 thresholds.*4 layers"):
        model.dymu.thresholds = [0.5] * 3
    assert model.dymu.mode == "threshold" and model.dymu.thresholds == [0.7] * 4
    with pytest.raises(ValueError, match=r"3 thresholds.*4 layers"):
        dymu_viz.patch(model, thresholds=[0.5] * 3)
    assert model.dymu.thresholds == [0.7] * 4


def test_thresholds_object_with_wrong_depth() -> None:
    model = make_hf_clip()
    with pytest.raises(ValueError, match=r"\(ViT-tiny\) have 6 layers but the encoder has 4"):
        dymu_viz.patch(model, thresholds=Thresholds.uniform(0.5, 6, model="ViT-tiny"))
    assert_unpatched(model)


def test_r_list_longer_than_the_model() -> None:
    with pytest.raises(ValueError, match=r"r lists 6 layers but the model has 4"):
        dymu_viz.patch(make_hf_clip(), r=[1] * 6)


def test_unknown_model_type_lists_supported_families() -> None:
    with pytest.raises(ValueError, match=r"Linear.*supported families") as info:
        dymu_viz.patch(nn.Linear(2, 2))
    for family in ("open_clip ViT", "timm ViT", "HF CLIPVisionModel", "HF SiglipVisionModel"):
        assert family in str(info.value)
    with pytest.raises(ValueError, match=r"supported families"):
        dymu_viz.encode(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 3, 4, 4))


def test_not_a_module_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"torch.nn.Module.*str"):
        dymu_viz.patch("ViT-B-16")


@pytest.mark.parametrize("factory, size", [(make_hf_clip, 56), (make_hf_siglip, 56), (make_open_clip, 64),
                                           (make_timm_map, 64)], ids=["hf_clip", "hf_siglip", "open_clip", "timm_map"])
def test_wrong_image_size_mentions_the_expected_size(factory, size) -> None:
    model = dymu_viz.patch(factory(), thresholds=0.5)
    x = torch.zeros(1, 3, size + 16, size + 16)
    expected = rf"expects {size}x{size} images, got {size + 16}x{size + 16}"
    with pytest.raises(ValueError, match=expected):
        dymu_viz.encode(model, x)
    with pytest.raises(ValueError, match=expected):
        model(x)


def test_wrong_pixel_rank() -> None:
    model = dymu_viz.patch(make_hf_clip(), thresholds=0.5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with B >= 1, got \(3, 56, 56\)"):
        dymu_viz.encode(model, torch.zeros(3, 56, 56))
    with pytest.raises(ValueError, match=r"with B >= 1, got \(0, 3, 56, 56\)"):  # an empty batch
        dymu_viz.encode(model, torch.zeros(0, 3, 56, 56))


def test_an_empty_image_set_has_no_counts_to_show() -> None:
    from dymu_viz import stats, viz
    for empty in ([], np.zeros((0, 4), int)):
        with pytest.raises(ValueError, match="no token counts: the image set is empty"):
            stats.count_matrix(empty)
    with pytest.raises(ValueError, match="the image set is empty"):
        viz.plot_token_extremes([], [])


@pytest.mark.parametrize("factory, size", [(make_hf_siglip, 56), (make_timm_map, 64)], ids=["hf_siglip", "timm_map"])
def test_nan_pixels(factory, size) -> None:
    model = dymu_viz.patch(factory(), thresholds=0.5)
    x = torch.zeros(2, 3, size, size)
    x[1, 2, 5, 7] = math.nan
    with pytest.raises(ValueError, match=r"NaN"):
        dymu_viz.encode(model, x)
    with pytest.raises(ValueError, match=r"NaN"):
        model(x)


def test_nan_threshold() -> None:
    model = make_hf_clip()
    with pytest.raises(ValueError, match=r"threshold is NaN"):
        dymu_viz.patch(model, thresholds=math.nan)
    assert_unpatched(model)
    with pytest.raises(ValueError, match=r"threshold is NaN"):
        dymu_viz.patch(model, thresholds=[0.5, math.nan, 0.5, 0.5])
    assert_unpatched(model)
    dymu_viz.patch(model, thresholds=0.5)
    with pytest.raises(ValueError, match=r"threshold is NaN"):
        model.dymu.thresholds = [math.nan] * 4
    assert model.dymu.thresholds == [0.5] * 4
    with pytest.raises(ValueError, match=r"threshold is NaN"):
        Thresholds([0.5, math.nan], [1, 1])


def test_unpatch_an_unpatched_model() -> None:
    model = make_open_clip()
    with pytest.raises(ValueError, match=r"VisionTransformer is not patched"):
        dymu_viz.unpatch(model)
    dymu_viz.patch(model)
    dymu_viz.unpatch(model)
    with pytest.raises(ValueError, match=r"not patched"):
        dymu_viz.unpatch(model)


def test_encode_an_unpatched_model() -> None:
    model = make_hf_clip()
    with pytest.raises(ValueError, match=r"dymu_viz\.patch\(model.*before encode"):
        dymu_viz.encode(model, torch.zeros(1, 3, 56, 56))
    dymu_viz.patch(model)
    dymu_viz.unpatch(model)
    with pytest.raises(ValueError, match=r"before encode"):
        dymu_viz.encode(model, torch.zeros(1, 3, 56, 56))


def test_unknown_merge_mode() -> None:
    with pytest.raises(ValueError, match=r"unknown merge mode 'tome'.*threshold"):
        dymu_viz.MergeConfig(mode="tome")


def test_timm_attn_mask_is_rejected() -> None:
    model = dymu_viz.patch(make_timm_map(), thresholds=0.5)
    with pytest.raises(ValueError, match=r"attn_mask"):
        model(torch.zeros(1, 3, 64, 64), attn_mask=torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize("factory", [make_hf_clip, make_hf_siglip], ids=["hf_clip", "hf_siglip"])
def test_hf_config_return_dict_false_gives_the_tuple_and_attentions_are_refused(factory) -> None:
    """A config saying return_dict=False gets the tuple the unpatched model returns (the same
    tensors, merging off); attention maps, asked for by argument or by the config, are refused by
    name instead of coming back as None."""
    model = factory()
    x = torch.randn(2, 3, 56, 56)
    model.config.return_dict = False
    vanilla = model(pixel_values=x)
    dymu_viz.patch(model, float("inf"))
    patched = model(pixel_values=x)
    assert isinstance(vanilla, tuple) and isinstance(patched, tuple) and len(patched) == len(vanilla)
    for a, b in zip(patched, vanilla):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not isinstance(model(pixel_values=x, return_dict=True), tuple)
    model(pixel_values=x, output_attentions=False)
    with pytest.raises(ValueError, match="output_attentions is not available on a DToMe-patched encoder"):
        model(pixel_values=x, output_attentions=True)
    model.set_attn_implementation("eager")  # HF allows output_attentions in a config only then
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions is not available"):
        model(pixel_values=x)
    model(pixel_values=x, output_attentions=False)


def test_numpy_and_torch_numbers_are_thresholds_and_r_strings_and_gaps_are_refused() -> None:
    import numpy as np
    model = make_hf_clip()  # 4 layers
    for value in (np.float32(0.5), torch.tensor(0.5), np.array([0.5] * 4), torch.tensor([0.5] * 4)):
        assert dymu_viz.patch(model, value).dymu.thresholds == [0.5] * 4
    for r, expected in ((np.int64(2), [2] * 4), (np.array([3, 1]), [3, 1, 0, 0]), (torch.tensor([1, 2, 3, 4]), [1, 2, 3, 4]),
                        ([np.int64(1)] * 4, [1] * 4)):
        assert dymu_viz.patch(model, r=r).dymu.r == expected  # an array is per-layer r, never (r, inflection)
    for bad in ("0.5", [0.5, None, 0.5, 0.5], True):
        with pytest.raises(TypeError, match="thresholds must be a number, one number per layer or a Thresholds"):
            dymu_viz.patch(model, bad)
    for bad in (2.0, [1.5, 2], True):
        with pytest.raises(TypeError, match="r must"):
            dymu_viz.patch(model, r=bad)
    assert model.dymu.r == [1] * 4  # a refused setting leaves the last one


@pytest.mark.parametrize("name", ["t.PTH", "t.ckpt", "t.json"])
def test_thresholds_files_are_read_by_content_not_name(tmp_path, name) -> None:
    reference = Thresholds([0.9, 0.8, 0.7], [1, 1, 1], model="ViT-test")
    checkpoint = reference.save_reference_checkpoint(tmp_path / name, "visual.transformer.resblocks")
    assert Thresholds.load(checkpoint).values == pytest.approx(reference.values)
    text = tmp_path / ("text_" + name)
    text.write_text("this is a note, not thresholds")
    with pytest.raises(ValueError, match="is neither a thresholds JSON file nor a torch checkpoint"):
        Thresholds.load(text)
    reference.save(text)
    assert Thresholds.load(text).values == reference.values


def test_timm_side_entries_refuse_while_merging() -> None:
    """timm's forward_features / forward_intermediates run the blocks without DToMe: refused by
    name while merging (not unmerged tokens passed off as merged), the unpatched result when
    merging is off; classes without them (HF, open_clip) do not gain them."""
    model = make_timm_map()
    x = torch.randn(2, 3, 64, 64)
    vanilla = model.forward_features(x)
    dymu_viz.patch(model, thresholds=0.5)
    for name in ("forward_features", "forward_intermediates"):
        with pytest.raises(ValueError, match=f"{name} runs the blocks without DToMe"):
            getattr(model, name)(x)
    model.dymu.thresholds = None
    assert torch.equal(model.forward_features(x), vanilla)
    dymu_viz.unpatch(model)
    assert torch.equal(model.forward_features(x), vanilla)
    hf = dymu_viz.patch(make_hf_clip(), 0.5)
    assert not hasattr(hf, "forward_features") and not hasattr(dymu_viz.patch(make_open_clip(), 0.5), "forward_features")


def test_timm_dynamic_padding_grid_covers_every_patch() -> None:
    """timm with dynamic_img_pad pads an image up to whole patches: the result's grid counts the
    padded patches, so merge maps of such an image work."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, dynamic_img_size=True,
                              dynamic_img_pad=True, num_classes=5).eval()
    dymu_viz.patch(model, 0.5)
    res = dymu_viz.encode(model, torch.randn(2, 3, 56, 72))  # 3.5 x 4.5 patches -> 4 x 5
    assert res.grid == (4, 5) and res.patch_groups().shape == (2, 4, 5)
