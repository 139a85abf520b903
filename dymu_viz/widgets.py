"""ipywidgets 8 explorers built on ``dymu_viz.viz``, for JupyterLab.

* ``MergeExplorer``: pick an image (bundled photos or an upload), scale the thresholds'
  distance from 1 or override them with one tau for every layer, scrub through the layers;
  the merge map, the per-layer count curve and the token counts re-render live.
* ``ThresholdExplorer``: pick a "Kout" target and a schedule; thresholds are re-calibrated on
  a calibration batch and the threshold profile and realized counts (calibration vs
  held-out) re-render. Profiles can be pinned to overlay several calibrations.

Both keep timings of their last update in ``latency`` (seconds) and show them.
"""

from __future__ import annotations

import html
import io
import time
from typing import Any, Mapping, Optional

import ipywidgets as w
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor, nn

from .calibrate import encoder_state, find_thresholds, n_patches_of
from .data import sample_photos
from .dataset import load_rgb
from .encoder import EncoderResult
from .patch import encode, patch
from .schedule import SCHEDULES
from .stats import count_matrix
from .thresholds import Thresholds
from .viz import display_images, figure_png, plot_count_comparison, plot_layer_counts, plot_thresholds, render_map


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes, enlarged ``scale`` times by pixel repetition (so 1-pixel
    group borders stay sharp when the browser shows the picture large)."""
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, format="PNG")
    return buffer.getvalue()


def model_input(model: nn.Module, pixels: Tensor) -> Tensor:
    """pixels moved to the device and dtype of the model's parameters."""
    param = next(model.parameters())
    return pixels.to(param.device, param.dtype)


class MergeExplorer(w.VBox):
    """Live merge map of one image under adjustable thresholds.

    model: an encoder ``dymu_viz.patch`` accepts (it is re-patched with the explored
    thresholds); preprocess: PIL image -> (3, H, W); thresholds: the calibrated starting
    point; images: name -> PIL image (default: the bundled photos).
    """

    def __init__(self, model: nn.Module, preprocess: Any, thresholds: Thresholds,
                 images: Optional[Mapping[str, Image.Image]] = None, style: str = "mean", width_px: int = 360):
        self.model, self.preprocess, self.base = model, preprocess, thresholds
        self.images = dict(images) if images is not None else sample_photos()
        self.width_px = width_px
        self.latency: dict[str, float] = {}
        self.result: Optional[EncoderResult] = None
        self.shown: Optional[np.ndarray] = None
        finite = [v for v in thresholds.values if np.isfinite(v)] or [0.9]
        self.image = w.Dropdown(options=list(self.images), description="image")
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload")
        self.scale = w.FloatSlider(value=1.0, min=0.0, max=3.0, step=0.05, description="(1−τ) ×",
                                   continuous_update=False, readout_format=".2f",
                                   tooltip="scale every layer's distance from 1: above 1 merges more, below 1 less")
        self.override = w.Checkbox(value=False, description="same τ for every layer")
        self.tau = w.FloatSlider(value=float(np.median(finite)), min=0.5, max=1.0, step=0.005, description="τ",
                                 continuous_update=False, disabled=True, readout_format=".3f")
        self.layer = w.IntSlider(value=thresholds.layers, min=0, max=thresholds.layers, description="layer")
        self.style = w.ToggleButtons(options=[("mean colour", "mean"), ("group size", "size")], value=style)
        self.map = w.Image(format="png", layout=w.Layout(width=f"{width_px}px"))
        self.curve = w.Image(format="png", layout=w.Layout(width=f"{width_px}px"))
        self.info = w.HTML()
        for widget, name in ((self.scale, "dymu-scale"), (self.tau, "dymu-tau"), (self.layer, "dymu-layer"),
                             (self.map, "dymu-map"), (self.info, "dymu-info")):
            widget.add_class(name)
        for widget in (self.image, self.scale, self.override, self.tau):
            widget.observe(self._settings_changed, "value")
        for widget in (self.layer, self.style):
            widget.observe(self._view_changed, "value")
        self.upload.observe(self._uploaded, "value")
        super().__init__([w.HBox([self.image, self.upload]), w.HBox([self.scale, self.override, self.tau]),
                          w.HBox([self.layer, self.style]), w.HBox([self.map, self.curve]), self.info])
        self.add_class("dymu-merge-explorer")
        self.update()

    def current_thresholds(self) -> Thresholds:
        """The base thresholds with their distance from 1 scaled (tau' = 1 - s (1 - tau), so
        s > 1 merges more and s = 0 merges nothing, whatever the model's typical tau), or one
        tau everywhere when overridden. The base schedule still decides which layers may merge;
        layers with tau = inf stay off."""
        s = self.scale.value

        def value(tau: float) -> float:
            if not np.isfinite(tau):  # off in the base schedule: stays off
                return tau
            if self.override.value:
                return self.tau.value
            return 1 - s * (1 - tau) if s > 0 else np.inf  # identical tokens score 1 + ulp > 1
        values = [value(tau) for tau in self.base.values]
        return Thresholds(values, self.base.r, model=self.base.model, schedule=self.base.schedule,
                          r_total=self.base.r_total)

    def update(self) -> None:
        """Re-encode the chosen image with the current thresholds, then redraw."""
        start = time.perf_counter()
        pixels = self.preprocess(self.images[self.image.value])[None]
        patch(self.model, self.current_thresholds())
        with torch.no_grad():
            self.result = encode(self.model, model_input(self.model, pixels))
        self.shown = display_images(pixels, self.preprocess)[0]
        self.latency["encode"] = time.perf_counter() - start
        self.render()

    def render(self) -> None:
        """Redraw the merge map, count curve and counts for the current layer and style."""
        start = time.perf_counter()
        layer, counts = self.layer.value, count_matrix(self.result)[0]
        groups = self.result.patch_groups(layer)[0].cpu().numpy()
        scale = max(1, -(-self.width_px // self.shown.shape[0]))
        self.map.value = png_bytes(render_map(self.shown, groups, self.style.value, self.result.patch_size), scale)
        self.curve.value = figure_png(self.curve_figure(counts, layer))
        self.latency["draw"] = time.perf_counter() - start
        self.info.value = (
            f"<b>{html.escape(self.image.value)}</b>: {counts[0]} → {counts[-1]} tokens; after layer {layer}: "
            f"<b class='dymu-count'>{counts[layer]}</b> tokens "
            f"<span style='color:gray'>(encode {1000 * self.latency['encode']:.0f} ms, "
            f"draw {1000 * self.latency['draw']:.0f} ms)</span>")

    def curve_figure(self, counts: np.ndarray, layer: int) -> Figure:
        """Token count per layer of the current image with the shown layer marked."""
        fig = Figure(figsize=(4.2, 3.6), layout="constrained")
        ax = plot_layer_counts(counts, [self.image.value], fig.subplots(), label=self.image.value, individual=False)
        ax.axvline(layer, color="0.5", ls=":")
        ax.set_ylim(0, counts[0] * 1.05)
        return fig

    def add_image(self, name: str, image: Image.Image) -> None:
        """Add (or replace) an image among the choices and show it, encoding once: changing
        a Dropdown's options would otherwise first select, and encode, the first image."""
        self.images[name] = image
        self.image.unobserve(self._settings_changed, "value")
        try:
            self.image.options = list(self.images)
            self.image.value = name
        finally:
            self.image.observe(self._settings_changed, "value")
        self.update()

    def _settings_changed(self, change: dict) -> None:
        self.tau.disabled = not self.override.value
        self.update()

    def _view_changed(self, change: dict) -> None:
        self.render()

    def _uploaded(self, change: dict) -> None:
        for item in change["new"]:
            try:
                self.add_image(item["name"], load_rgb(io.BytesIO(bytes(item["content"]))))
            except Exception as err:  # a bad upload must not break the explorer
                self.info.value = f"<b>could not read {html.escape(item['name'])}</b>: {html.escape(str(err))}"


class ThresholdExplorer(w.VBox):
    """Calibrate thresholds on a batch of images for a chosen "Kout" target and schedule, and
    show the threshold profile and the token counts it realizes on the calibration images
    and on held-out ones.

    calibration / heldout: (B, 3, H, W) preprocessed images; the calibration runs in batches
    of ``batch_size`` (thresholds are batch-level statistics, as in the paper).
    """

    def __init__(self, model: nn.Module, calibration: Tensor, heldout: Optional[Tensor] = None, target: int = 72,
                 schedule: str = "constant", batch_size: int = 64, name: str = "", width_px: int = 900):
        self.model, self.calibration, self.heldout = model, calibration, heldout
        self.batch_size, self.name = batch_size, name
        self.latency: dict[str, float] = {}
        self.pinned: dict[str, Thresholds] = {}
        self.thresholds: Optional[Thresholds] = None
        self.counts: dict[str, np.ndarray] = {}
        state = encoder_state(model)
        n_patches, self.protected = n_patches_of(state, self.calibration), state.adapter.protected  # target line: K + CLS
        self.target = w.IntSlider(value=min(target, n_patches), min=1, max=n_patches, description="K (Kout)",
                                  continuous_update=False)
        self.schedule = w.Dropdown(options=list(SCHEDULES), value=schedule, description="schedule")
        self.pin = w.Button(description="pin this profile")
        self.clear = w.Button(description="clear pins")
        self.plot = w.Image(format="png", layout=w.Layout(width=f"{width_px}px"))
        self.info = w.HTML()
        for widget in (self.target, self.schedule):
            widget.observe(lambda change: self.update(), "value")
        self.pin.on_click(lambda button: self.pin_current())
        self.clear.on_click(lambda button: self.clear_pins())
        self.target.add_class("dymu-target")
        self.info.add_class("dymu-info")
        super().__init__([w.HBox([self.target, self.schedule, self.pin, self.clear]), self.plot, self.info])
        self.update()

    def label(self) -> str:
        return f"{self.target.value}out {self.schedule.value}"

    def counts_of(self, pixels: Tensor) -> np.ndarray:
        """(B, L+1) token counts of pixels under the current (patched) thresholds."""
        with torch.no_grad():
            return count_matrix([encode(self.model, model_input(self.model, p)) for p in pixels.split(self.batch_size)])

    def update(self) -> None:
        """Re-calibrate for the chosen target and schedule, re-count, redraw."""
        start = time.perf_counter()
        batches = [model_input(self.model, p) for p in self.calibration.split(self.batch_size)]
        self.thresholds = find_thresholds(self.model, batches, target=f"{self.target.value}out",
                                          schedule=self.schedule.value, name=self.name)
        self.latency["calibrate"] = time.perf_counter() - start
        start = time.perf_counter()
        patch(self.model, self.thresholds)
        self.counts = {"calibration": self.counts_of(self.calibration)}
        if self.heldout is not None:
            self.counts["held-out"] = self.counts_of(self.heldout)
        self.latency["count"] = time.perf_counter() - start
        self.render()

    def render(self) -> None:
        """Draw the threshold profiles, per-layer counts and final-count histograms."""
        start = time.perf_counter()
        fig = Figure(figsize=(13, 3.6), layout="constrained")
        left, middle, right = fig.subplots(1, 3)
        plot_thresholds({**self.pinned, self.label(): self.thresholds}, left)
        plot_count_comparison(self.counts, self.target.value + self.protected, (middle, right))
        self.plot.value = figure_png(fig)
        self.latency["draw"] = time.perf_counter() - start
        summary = "; ".join(f"{kind}: {c[:, -1].mean():.1f} ± {c[:, -1].std():.1f} tokens" for kind, c in self.counts.items())
        timing = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in self.latency.items())
        targeted = f"{self.target.value} tokens" + (" + CLS" if self.protected else "")
        self.info.value = f"<b>{self.label()}</b> ({targeted} targeted): {summary} " \
                          f"<span style='color:gray'>({timing})</span>"

    def pin_current(self) -> None:
        """Keep the current profile in the plot for comparison."""
        self.pinned[self.label()] = self.thresholds
        self.render()

    def clear_pins(self) -> None:
        self.pinned.clear()
        self.render()
