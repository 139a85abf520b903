"""How close DToMe's decisions are to their thresholds (``EncoderResult.margins``), and the
bundled calibration pictures that keep a threshold off the images it is applied to."""

import numpy as np
import pytest
import torch

import dymu_viz
from dymu_viz import merge
from dymu_viz.data import CALIBRATION_PHOTOS, PHOTOS
from tiny_models import make_hf_clip, make_hf_siglip, redundancy_images

pytestmark = [pytest.mark.exact_counts, pytest.mark.usefixtures("no_grad")]


def test_threshold_margin_is_the_closest_valid_edge():
    best = torch.tensor([[0.9, 0.5, -torch.inf], [-torch.inf, -torch.inf, -torch.inf], [0.71, 0.69, 0.2]])
    margin = merge.threshold_margin(best, 0.7)
    assert margin[0].item() == pytest.approx(0.2) and margin[1].item() == float("inf")
    assert margin[2].item() == pytest.approx(0.01)


@pytest.mark.parametrize("make", [make_hf_clip, make_hf_siglip], ids=["cls", "no_cls"])
def test_moving_thresholds_by_less_than_the_margins_changes_nothing_and_past_one_does(make):
    """Every image's counts and groups stay put when every threshold moves by less than that
    image's smallest margin; moving one layer's threshold just past an image's margin there
    flips that image's closest edge, so its count after that layer changes by one."""
    model = make(image=112, layers=4).double()
    x = redundancy_images(112, 14, torch.float64)
    taus = [0.9, 0.8, 0.7, 0.6]
    dymu_viz.patch(model, taus)
    base = dymu_viz.encode(model, x)
    margins = base.margins
    assert margins.shape == (x.shape[0], 4) and bool((margins > 0).all())
    smallest = float(margins.min())
    for sign in (-1, 1):
        dymu_viz.patch(model, [t + sign * smallest / 2 for t in taus])
        moved = dymu_viz.encode(model, x)
        assert torch.equal(moved.counts, base.counts) and torch.equal(moved.groups, base.groups)
    image, layer = divmod(int(margins.argmin()), 4)  # the closest edge of all: put it across its tau
    nudged = list(taus)
    dymu_viz.patch(model, taus)
    record = []
    original = merge.select_threshold

    def recording(best, size, tau, protected):
        record.append(best.clone())
        return original(best, size, tau, protected)

    merge.select_threshold = recording
    try:
        dymu_viz.encode(model, x[image:image + 1])
    finally:
        merge.select_threshold = original
    best = record[layer][0]
    closest = float(best[torch.isfinite(best)][(best[torch.isfinite(best)] - taus[layer]).abs().argmin()])
    assert abs(closest - taus[layer]) == pytest.approx(float(margins[image, layer]), abs=1e-15)
    nudged[layer] = closest + (1e-12 if closest > taus[layer] else -1e-12)  # now on the other side
    dymu_viz.patch(model, nudged)
    flipped = dymu_viz.encode(model, x[image:image + 1])
    step = 1 if closest > taus[layer] else -1  # an edge that merged no longer does, or the reverse
    assert int(flipped.counts[0, layer + 1]) == int(base.counts[image, layer + 1]) + step


def test_margins_only_in_threshold_mode():
    model = make_hf_clip(image=56, layers=2)
    x = redundancy_images(56, 14)
    dymu_viz.patch(model, r=3)
    assert dymu_viz.encode(model, x).margins is None
    dymu_viz.patch(model, [float("inf"), 0.5])
    result = dymu_viz.encode(model, x)
    assert result.margins[:, 0].eq(float("inf")).all()  # an infinite threshold: no edge near it
    assert torch.equal(result.select(1).margins, result.margins[1:2])


def test_calibration_photos_are_disjoint_from_the_sample_photos():
    assert not set(CALIBRATION_PHOTOS) & set(PHOTOS)
    calibration = dymu_viz.calibration_photos()
    samples = dymu_viz.sample_photos()
    assert len(calibration) == 12 and all(im.mode == "RGB" for im in calibration.values())
    sample_arrays = [np.asarray(im) for im in samples.values()]
    for name, image in calibration.items():
        pixels = np.asarray(image)
        assert not any(pixels.shape == s.shape and np.array_equal(pixels, s) for s in sample_arrays), name
    with pytest.raises(ValueError, match="unknown calibration photo.*available: camera"):
        dymu_viz.calibration_photos(["chelsea"])
