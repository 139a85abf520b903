"""The explorers re-render what the model does under the chosen settings: the shown picture
is the merge map of a fresh encode, the shown count is the result's count at the chosen
layer, and the thresholds in use are the ones the controls describe."""

from __future__ import annotations

import datetime
import io
import re

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import dymu_viz
from dymu_viz import viz, widgets
from tiny_models import make_open_clip

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels

PREPROCESS = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return dymu_viz.sample_photos(["astronaut", "rocket", "coffee", "chelsea"])


@pytest.fixture
def model() -> torch.nn.Module:
    return make_open_clip(layers=3, image=64, patch=16)


@pytest.fixture
def explorer(model, photos) -> widgets.MergeExplorer:
    base = dymu_viz.Thresholds([0.7, 0.7, 0.7], [1, 1, 1])
    return widgets.MergeExplorer(model, PREPROCESS, base, photos)


def shown_count(explorer: widgets.MergeExplorer) -> int:
    return int(re.search(r"class='dymu-count'>(\d+)<", explorer.info.value).group(1))


def map_pixels(explorer: widgets.MergeExplorer) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(explorer.map.value)))


def expected_map(explorer: widgets.MergeExplorer, result: dymu_viz.EncoderResult, layer: int, style: str) -> np.ndarray:
    image = viz.display_images(PREPROCESS(explorer.images[explorer.image.value])[None], PREPROCESS)[0]
    out = viz.render_map(image, result.patch_groups(layer)[0].numpy(), style)
    scale = -(-explorer.width_px // 64)
    return np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)


def encode_alone(model: torch.nn.Module, image: Image.Image, thresholds: list[float]) -> dymu_viz.EncoderResult:
    dymu_viz.patch(model, thresholds)
    with torch.no_grad():
        return dymu_viz.encode(model, PREPROCESS(image)[None])


def test_shows_the_merge_map_and_count_of_a_fresh_encode(explorer, model, photos) -> None:
    reference = encode_alone(model, photos["astronaut"], [0.7] * 3)
    assert torch.equal(explorer.result.counts, reference.counts)
    assert shown_count(explorer) == int(reference.counts[0, -1]) < 17
    np.testing.assert_array_equal(map_pixels(explorer), expected_map(explorer, reference, 3, "mean"))
    assert set(explorer.latency) == {"encode", "draw"}


def test_threshold_scale_re_encodes_and_changes_count_and_picture(explorer, model) -> None:
    before_count, before_png = shown_count(explorer), explorer.map.value
    explorer.scale.value = 0.0  # merges nothing: inf, not 1 - 0 * (1 - tau) = 1, which identical tokens beat
    assert model.dymu.thresholds == [np.inf] * 3
    assert shown_count(explorer) == 17 != before_count and explorer.map.value != before_png
    explorer.scale.value = 1.5
    assert model.dymu.thresholds == pytest.approx([1 - 1.5 * 0.3] * 3)
    assert shown_count(explorer) < before_count


def test_layer_scrub_redraws_without_re_encoding(explorer) -> None:
    result = explorer.result
    for layer in range(4):
        explorer.layer.value = layer
        assert explorer.result is result
        assert shown_count(explorer) == int(result.counts[0, layer])
        np.testing.assert_array_equal(map_pixels(explorer), expected_map(explorer, result, layer, "mean"))
    explorer.style.value = "size"
    np.testing.assert_array_equal(map_pixels(explorer), expected_map(explorer, result, 3, "size"))


def test_override_uses_one_tau_everywhere(explorer, model, photos) -> None:
    assert explorer.tau.disabled
    explorer.override.value = True
    assert not explorer.tau.disabled
    explorer.tau.value = 0.5
    assert model.dymu.thresholds == [0.5] * 3
    reference = encode_alone(model, photos["astronaut"], [0.5] * 3)
    assert torch.equal(explorer.result.counts, reference.counts)


def test_layers_off_in_the_base_schedule_stay_off_under_every_control(model, photos) -> None:
    base = dymu_viz.Thresholds([0.7, np.inf, 0.7], [1, 0, 1])
    explorer = widgets.MergeExplorer(model, PREPROCESS, base, photos)
    explorer.scale.value = 1.5
    assert model.dymu.thresholds == pytest.approx([0.55, np.inf, 0.55])
    explorer.override.value = True
    explorer.tau.value = 0.5
    assert model.dymu.thresholds == [0.5, np.inf, 0.5]
    assert explorer.result.counts[0, 2] == explorer.result.counts[0, 1]  # block 2 merged nothing


def upload(name: str, content: bytes) -> dict:
    """One file as ipywidgets 8's FileUpload holds it after a browser upload."""
    return {"name": name, "type": "image/png", "size": len(content), "content": memoryview(content),
            "last_modified": datetime.datetime.now(datetime.timezone.utc)}


def test_picking_and_uploading_images(explorer, model, photos) -> None:
    explorer.image.value = "rocket"
    assert torch.equal(explorer.result.counts, encode_alone(model, photos["rocket"], [0.7] * 3).counts)
    png = io.BytesIO()
    dymu_viz.shapes_image(5).save(png, format="PNG")
    encodes, update = [], explorer.update
    explorer.update = lambda: (encodes.append(explorer.image.value), update())
    explorer.upload.value = (upload("mine.png", png.getvalue()),)
    assert explorer.image.value == "mine.png" and "mine.png" in explorer.image.options
    assert encodes == ["mine.png"]  # encoded once, the new image only
    assert torch.equal(explorer.result.counts, encode_alone(model, dymu_viz.shapes_image(5), [0.7] * 3).counts)
    explorer.upload.value = (upload("broken.png", b"abc"),)
    assert "could not read broken.png" in explorer.info.value and explorer.image.value == "mine.png"


def test_threshold_explorer_calibrates_and_counts_both_sets(model, photos) -> None:
    pixels = torch.stack([PREPROCESS(p) for p in photos.values()])
    explorer = widgets.ThresholdExplorer(model, pixels[:2], pixels[2:], target=8, batch_size=2)
    direct = dymu_viz.find_thresholds(model, [pixels[:2]], target="8out")
    assert explorer.thresholds.values == direct.values and explorer.thresholds.r == direct.r
    dymu_viz.patch(model, direct)
    with torch.no_grad():
        for kind, part in (("calibration", pixels[:2]), ("held-out", pixels[2:])):
            np.testing.assert_array_equal(explorer.counts[kind], dymu_viz.encode(model, part).counts.numpy())
    assert bytes(explorer.plot.value).startswith(b"\x89PNG") and "8out constant" in explorer.info.value
    explorer.pin.click()
    explorer.schedule.value = "linear"
    assert explorer.thresholds.r == dymu_viz.find_thresholds(model, [pixels[:2]], target="8out", schedule="linear").r
    assert list(explorer.pinned) == ["8out constant"] and "8out linear" in explorer.info.value
    explorer.clear.click()
    assert explorer.pinned == {}
    assert set(explorer.latency) == {"calibrate", "count", "draw"}
