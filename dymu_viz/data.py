"""Images that ship with installed packages, and synthetic images of known complexity."""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo pairs: the left view
            array = array[0]
        return Image.fromarray(array).convert("RGB")
    return load


def _sklearn(filename: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image
        return Image.fromarray(load_sample_image(filename)).convert("RGB")
    return load


def _grace_hopper() -> Image.Image:
    from matplotlib import cbook
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


# name -> loader; all of these are bundled inside scikit-image, scikit-learn and matplotlib.
PHOTOS: dict[str, Callable[[], Image.Image]] = {
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _grace_hopper,
}


# A second, disjoint set (scikit-image's other bundled pictures, several of them greyscale) to
# calibrate thresholds on. A threshold is the score of one edge of its calibration images, so
# counts on those very images sit exactly on a threshold, where the last bit of a matrix product
# (which differs between CPU kernels) decides a merge. Thresholds found on these and applied to
# PHOTOS, as real thresholds are applied to images they were not found on, leave no such tie.
CALIBRATION_PHOTOS: dict[str, Callable[[], Image.Image]] = {
    name: _skimage(name) for name in ("camera", "coins", "brick", "grass", "gravel", "moon", "page", "text",
                                      "clock", "colorwheel", "retina", "stereo_motorcycle")
}


def _load(table: dict[str, Callable[[], Image.Image]], names: list[str] | None, what: str) -> dict[str, Image.Image]:
    names = list(table) if names is None else names
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; available: {', '.join(table)}")
    return {n: table[n]() for n in names}


def sample_photos(names: list[str] | None = None) -> dict[str, Image.Image]:
    """The bundled photos as RGB PIL images, by name (all of them by default)."""
    return _load(PHOTOS, names, "sample photo")


def calibration_photos(names: list[str] | None = None) -> dict[str, Image.Image]:
    """Bundled pictures disjoint from ``sample_photos``, as RGB PIL images, by name (all by
    default): calibrate thresholds on these, evaluate on those (see ``CALIBRATION_PHOTOS``)."""
    return _load(CALIBRATION_PHOTOS, names, "calibration photo")


def shapes_image(n_shapes: int, size: int = 448, seed: int = 0) -> Image.Image:
    """A flat grey canvas with ``n_shapes`` random coloured rectangles and ellipses:
    complexity grows with n_shapes (0 gives a constant image)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    for _ in range(n_shapes):
        x0, y0 = rng.integers(0, size - size // 8, 2)
        w, h = rng.integers(size // 16, size // 3, 2)
        box = (int(x0), int(y0), int(min(x0 + w, size)), int(min(y0 + h, size)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image
