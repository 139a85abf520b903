"""Matplotlib pictures of what DToMe merged and how many tokens it kept.

Functions take results (``EncoderResult``, count arrays, ``Thresholds``), never model
internals. Single-panel plots take an optional ``ax`` and return it; multi-panel ones return
a ``Figure``. Figures are built without pyplot (no global state), so they work in scripts,
widgets and notebooks alike (in a notebook, show a returned Axes with ``ax.figure``).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .encoder import EncoderResult
from .stats import CountsLike, count_matrix, layer_count_stats, token_accounting
from .thresholds import Thresholds

ThresholdsLike = Union[Thresholds, Sequence[float]]
MAP_STYLES = ("mean", "size")


def display_image(pixels: torch.Tensor, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None) -> np.ndarray:
    """(3, H, W) model input -> (H, W, 3) uint8 as the model saw it. Without mean/std the
    normalisation is undone by a min-max stretch."""
    x = pixels.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def normalisation_of(preprocess: Any) -> tuple[Optional[tuple], Optional[tuple]]:
    """(mean, std) that ``preprocess`` normalises with, or (None, None) when it has none: the
    Normalize step of a torchvision Compose, or an HF image processor's image_mean / image_std
    (the processor itself, a full processor holding one, or ``models.HFImageTransform``)."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(t.mean), tuple(t.std)
    hf = getattr(preprocess, "processor", preprocess)
    hf = getattr(hf, "image_processor", hf)
    if getattr(hf, "do_normalize", False) and getattr(hf, "image_mean", None) is not None:
        return tuple(np.broadcast_to(hf.image_mean, 3).tolist()), tuple(np.broadcast_to(hf.image_std, 3).tolist())
    return None, None


def display_images(pixels: torch.Tensor, preprocess: Any = None) -> list[np.ndarray]:
    """(B, 3, H, W) model inputs -> B (H, W, 3) uint8 images as the model saw them, undoing
    ``preprocess``'s normalisation (a min-max stretch, with a warning, when it names none)."""
    mean, std = normalisation_of(preprocess)
    if preprocess is not None and mean is None:
        warnings.warn(f"found no normalisation in {type(preprocess).__name__}; the images are shown "
                      "min-max stretched, so their colours are approximate", stacklevel=2)
    return [display_image(p, mean, std) for p in pixels]


def group_borders(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour belongs to another group."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def pixel_labels(patch_groups: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(gh, gw) group id per patch -> (H, W) group id per pixel, for an image of ``shape``
    (H, W) that is a whole number of grid cells in each direction."""
    gh, gw = patch_groups.shape
    H, W = shape
    if H % gh or W % gw:
        raise ValueError(f"image {H}x{W} does not divide into the {gh}x{gw} patch grid")
    return np.kron(patch_groups, np.ones((H // gh, W // gw), dtype=patch_groups.dtype))


def fit_to_grid(image: np.ndarray, grid: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
    """The (gh*ph, gw*pw, 3) picture a grid of ``patch``-pixel patches covers, from the model's
    input ``image`` (H, W, 3): up to a patch more is cropped at the bottom / right (the
    embedding never sees it), up to a patch less is padded there in grey (timm's dynamic
    padding). Any other size is not this model's input, and is refused rather than stretched."""
    (gh, gw), (ph, pw) = grid, patch
    H, W = gh * ph, gw * pw
    h, w = image.shape[:2]
    if not (H - ph < h < H + ph and W - pw < w < W + pw):
        raise ValueError(
            f"image {h}x{w} is not the input of a {gh}x{gw} grid of {ph}x{pw}-pixel patches ({H}x{W}); "
            "draw the pixels the model ran on (viz.display_images(pixels, preprocess))")
    out = np.full((H, W, image.shape[2]), 128, dtype=image.dtype)
    out[:min(h, H), :min(w, W)] = image[:H, :W]
    return out


def group_sizes(patch_groups: np.ndarray) -> np.ndarray:
    """(gh, gw) group ids -> (gh, gw) number of patches in each patch's group."""
    _, inverse, counts = np.unique(patch_groups, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(patch_groups.shape)]


def merge_map(image: np.ndarray, patch_groups: np.ndarray, border: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """ToMe-style map: every merged group filled with its mean colour, groups outlined.

    image: (H, W, 3) uint8 covering the patch grid exactly; patch_groups: (gh, gw) group ids.
    Returns an (H, W, 3) uint8 image."""
    labels = pixel_labels(patch_groups, image.shape[:2])
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape)
    counts = np.bincount(dense.ravel())
    out = np.empty_like(image)
    for c in range(3):
        means = np.bincount(dense.ravel(), weights=image[..., c].ravel().astype(np.float64)) / counts
        out[..., c] = np.round(means[dense]).astype(np.uint8)
    out[group_borders(labels)] = border
    return out


def size_colours(sizes: np.ndarray, n_patches: int, cmap: str = "viridis") -> np.ndarray:
    """Group sizes (any shape) -> uint8 RGB (shape + (3,)): colour = cmap(log size / log
    n_patches), so 1 patch is the colormap's start and a whole-image group its end, the
    same scale for every image and layer."""
    scale = np.log(sizes) / np.log(max(n_patches, 2))
    return np.round(colormaps[cmap](scale)[..., :3] * 255).astype(np.uint8)


def size_map(patch_groups: np.ndarray, shape: tuple[int, int], cmap: str = "viridis",
             border: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Map of group sizes: every patch coloured by how many patches its group holds (see
    ``size_colours``), groups outlined. Returns an (H, W, 3) uint8 image of ``shape``."""
    labels = pixel_labels(patch_groups, shape)
    sizes = pixel_labels(group_sizes(patch_groups), shape)
    out = size_colours(sizes, patch_groups.size, cmap)
    out[group_borders(labels)] = border
    return out


def render_map(image: np.ndarray, patch_groups: np.ndarray, style: str = "mean",
               patch: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(H, W, 3) uint8 merge map in one of ``MAP_STYLES``: "mean" (mean colour per group) or
    "size" (colour by group size). With ``patch`` (pixels per patch, ``EncoderResult.patch_size``)
    the image is first fitted to the grid the model saw (``fit_to_grid``); without it the image
    must divide into the grid (any scale, e.g. Qwen's unit grids)."""
    if style not in MAP_STYLES:
        raise ValueError(f"unknown map style {style!r}; choose one of {', '.join(MAP_STYLES)}")
    if patch is not None:
        image = fit_to_grid(image, patch_groups.shape, patch)
    return merge_map(image, patch_groups) if style == "mean" else size_map(patch_groups, image.shape[:2])


def tokens_title(result: EncoderResult, b: int, layer: int) -> str:
    """Image b's token count at a layer as a map title; a protected CLS token, which covers no
    patch of the map, is named."""
    n = int(result.counts[b, layer])
    return f"{n} tokens" + (f" ({n - result.protected} + CLS)" if result.protected else "")


def layer_index(result: EncoderResult, layer: int) -> int:
    """A possibly negative layer index (0 = input, -1 = last) as a non-negative one."""
    return layer if layer >= 0 else result.counts.shape[1] + layer


def new_axes(ax: Optional[Axes], figsize: tuple[float, float] = (5.0, 3.5)) -> Axes:
    """The given Axes, or one on a fresh pyplot-free Figure."""
    return ax if ax is not None else Figure(figsize=figsize, layout="constrained").subplots()


def next_colour(ax: Axes) -> str:
    """The colour-cycle entry after the ones already in ax's legend, so each call that
    overlays another image set gets its own colour (its curve and band alike)."""
    return f"C{len(ax.get_legend_handles_labels()[0])}"


def legend_above(ax: Axes) -> None:
    """The legend in one row above the plot, clear of bars and their labels."""
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=2, fontsize=8, frameon=False)


def plot_merge_map(image: np.ndarray, result: EncoderResult, b: int = 0, layer: int = -1, style: str = "mean",
                   ax: Optional[Axes] = None) -> Axes:
    """Merge map of image b of ``result`` after ``layer`` (0 = input, -1 = last), titled with
    its token count there. image: (H, W, 3) uint8, as the model saw it."""
    ax = new_axes(ax, (3.0, 3.2))
    groups = result.patch_groups(layer)[b].cpu().numpy()
    ax.imshow(render_map(image, groups, style, result.patch_size))
    ax.set_title(f"after layer {layer_index(result, layer)}: {tokens_title(result, b, layer)}", fontsize=9)
    ax.set_axis_off()
    return ax


def plot_merge_maps(images: Sequence[np.ndarray], result: EncoderResult, titles: Optional[Sequence[str]] = None,
                    layers: Sequence[int] = (-1,), style: str = "mean", rows: Optional[Sequence[int]] = None) -> Figure:
    """One row per image: the input, then its merge map (``style`` "mean" or "size") at each
    requested layer, titled with the token count there. Image i is row ``rows[i]`` of the
    result (default: row i), so a few images of a large batch can be shown."""
    n, cols = len(images), 1 + len(layers)
    rows = list(rows) if rows is not None else list(range(n))
    fig = Figure(figsize=(2.6 * cols, 2.8 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for i, (b, image) in enumerate(zip(rows, images)):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(titles[i] if titles else f"image {b}", fontsize=9)
        axes[i, 0].set_axis_off()
        for j, layer in enumerate(layers, start=1):
            plot_merge_map(image, result, b, layer, style, axes[i, j])
    return fig


def plot_unit_merge_maps(images: Sequence[Any], mappings: Sequence[torch.Tensor], grids: torch.Tensor,
                         titles: Optional[Sequence[str]] = None, unit: int = 28, style: str = "mean") -> Figure:
    """Qwen2-VL merge maps on the unit grid: one row per image, the image at the resolution the
    processor chose, then its units (``unit`` px squares, 2 x 2 patches) filled per merged token.
    mappings: per image (U,) unit -> merged token (``ImageTokens.mapping``, raster order);
    grids: (images, 3) ``image_grid_thw`` in patches."""
    n = len(images)
    fig = Figure(figsize=(5.2, 2.6 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, 2, squeeze=False))
    for i, (image, mapping, (_, gh, gw)) in enumerate(zip(images, mappings, grids.tolist())):
        h, w = gh // 2, gw // 2
        shown = np.asarray(image.convert("RGB").resize((w * unit, h * unit)))
        groups = mapping.cpu().numpy().reshape(h, w)
        axes[i, 0].imshow(shown)
        axes[i, 0].set_title(f"{titles[i] if titles else f'image {i}'}: {h} x {w} units", fontsize=9)
        axes[i, 1].imshow(render_map(shown, groups, style))
        axes[i, 1].set_title(f"{len(np.unique(groups))} tokens of {h * w}", fontsize=9)
        for ax in axes[i]:
            ax.set_axis_off()
    return fig


def plot_tower_merge_maps(images: Sequence[Any], maps: Sequence[Mapping[int, torch.Tensor]], grids: torch.Tensor,
                          titles: Optional[Sequence[str]] = None, unit: int = 28, style: str = "mean") -> Figure:
    """Merge maps inside a tower that merges whole units (``vlm.unit_tower``), block by block: one row per
    image, the image, then its unit grid after every block that merged. maps: per image, block ->
    (U,) unit -> its token after that block (``TowerRecord.item_maps``, raster order); grids:
    (images, 3) ``image_grid_thw`` in patches."""
    blocks = sorted({k for m in maps for k in m})
    n = len(images)
    fig = Figure(figsize=(2.6 * (1 + len(blocks)), 2.6 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, 1 + len(blocks), squeeze=False))
    for i, (image, per_block, (_, gh, gw)) in enumerate(zip(images, maps, grids.tolist())):
        h, w = gh // 2, gw // 2
        shown = np.asarray(image.convert("RGB").resize((w * unit, h * unit)))
        axes[i, 0].imshow(shown)
        axes[i, 0].set_title(f"{titles[i] if titles else f'image {i}'}: {h * w} units", fontsize=9)
        for j, block in enumerate(blocks, start=1):
            if block in per_block:
                groups = per_block[block].cpu().numpy().reshape(h, w)
                axes[i, j].imshow(render_map(shown, groups, style))
                axes[i, j].set_title(f"after block {block}: {len(np.unique(groups))} tokens", fontsize=9)
        for ax in axes[i]:
            ax.set_axis_off()
    return fig


def tower_count_matrix(accounting: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Per image of ``accounting`` (``model.dymu_vlm.last``, prompts in order, images in each):
    its units, then its tokens after every ViT block (in-tower unit merging), (n, L + 1)."""
    rows: list[list[int]] = []
    for acc in accounting:
        if "tower_tokens" not in acc:
            raise ValueError("this accounting has no tower_tokens: the tower did not merge (patch_vlm(tower=...))")
        rows += acc["tower_tokens"]
    return np.asarray(rows, dtype=np.int64)


def plot_tower_counts(accounting: Sequence[Mapping[str, Any]], names: Optional[Sequence[str]] = None,
                      ax: Optional[Axes] = None, label: str = "mean", color: Optional[str] = None) -> Axes:
    """Tokens after every ViT block of in-tower unit merging, per image (thin lines) and
    their mean ± std, from ``model.dymu_vlm.last``."""
    from matplotlib.ticker import MaxNLocator

    ax = plot_layer_counts(tower_count_matrix(accounting), names, ax, label, color)
    ax.set_xlabel("ViT blocks run (0: the units entering the tower)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return ax


def image_names(names: Optional[Sequence[str]], n: int) -> list[str]:
    """The given names, or "image 0", "image 1", ... for n images."""
    if names is not None and len(names) != n:
        raise ValueError(f"{len(names)} names for {n} images; give one name per image")
    return list(names) if names is not None else [f"image {i}" for i in range(n)]


def paired_bars(ax: Optional[Axes], names: Sequence[str], back: np.ndarray, front: np.ndarray,
                labels: tuple[str, str], texts: Sequence[str], color: str, xlabel: str) -> Axes:
    """Horizontal bars, one row per image (first on top): a light ``back`` bar with a dark
    ``front`` bar over it, and a text at the end of the back bar. labels: (back, front)
    legend entries."""
    ax = new_axes(ax, (5.0, 0.9 + 0.3 * len(names)))
    y = np.arange(len(names))
    ax.barh(y, back, color="0.85", label=labels[0])
    ax.barh(y, front, color=color, label=labels[1])
    for yi, x, text in zip(y, back, texts):
        ax.text(x, yi, f" {text}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0, max(back) * 1.45)
    ax.set_xlabel(xlabel)
    legend_above(ax)
    return ax


def plot_token_counts(counts: CountsLike, names: Optional[Sequence[str]] = None, ax: Optional[Axes] = None) -> Axes:
    """Per image, input tokens (light bar) and output tokens (dark bar), labelled "in -> out".
    counts: a result, results, or (B, L+1) counts."""
    c = count_matrix(counts)
    return paired_bars(ax, image_names(names, len(c)), c[:, 0], c[:, -1], ("input", "output"),
                       [f"{row[0]} → {row[-1]}" for row in c], "C0", "tokens")


def plot_layer_counts(counts: CountsLike, names: Optional[Sequence[str]] = None, ax: Optional[Axes] = None,
                      label: str = "mean", color: Optional[str] = None, individual: bool = True) -> Axes:
    """Token count after every layer (x = 0 for the input, L for the last block): one thin
    line per image (when ``individual``), then their mean as a thick line inside a ± std band.
    Call again on the same ax with another label/color to overlay a second image set."""
    c = count_matrix(counts)
    labels = image_names(names, len(c))
    ax = new_axes(ax)
    x = np.arange(c.shape[1])
    color = color or next_colour(ax)
    if individual:
        for name, row in zip(labels, c):
            ax.plot(x, row, color=color, lw=0.8, alpha=0.35, gid=name)
    mean, std = layer_count_stats(c)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    ax.plot(x, mean, color=color, lw=2, label=f"{label} ± std ({len(c)} images)" if len(c) > 1 else label)
    ax.set_xlabel("layer (0 = input)")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=8)
    return ax


def plot_count_histogram(counts: CountsLike, ax: Optional[Axes] = None, bins: Union[int, Sequence[float], str] = "auto",
                         label: str = "images", color: Optional[str] = None) -> Axes:
    """Histogram of the final token counts (one per image); call again on the same ax to
    overlay another image set (pass the same ``bins``)."""
    finals = count_matrix(counts)[:, -1]
    ax = new_axes(ax)
    color = color or next_colour(ax)
    ax.hist(finals, bins=bins, color=color, alpha=0.6,
            label=f"{label}: {finals.mean():.1f} ± {finals.std():.1f} (n={len(finals)})")
    ax.set_xlabel("output tokens per image")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    return ax


def plot_count_summary(counts: CountsLike, names: Optional[Sequence[str]] = None) -> Figure:
    """Three panels over one image set: per-image input -> output counts, per-layer curves
    with the mean ± std band, and the histogram of final counts."""
    c = count_matrix(counts)
    fig = Figure(figsize=(15, max(3.5, 0.9 + 0.3 * len(c))), layout="constrained")
    left, middle, right = fig.subplots(1, 3)
    plot_token_counts(c, names, left)
    plot_layer_counts(c, names, middle)
    plot_count_histogram(c, right)
    return fig


def plot_count_comparison(sets: Mapping[str, CountsLike], target: Optional[float] = None,
                          axes: Optional[Sequence[Axes]] = None) -> Figure:
    """Several image sets (e.g. calibration vs held-out) overlaid: per-layer mean ± std
    curves (with the ``target`` count as a dotted line) and final-count histograms on
    shared bins. axes: two Axes to draw into (default: a new figure)."""
    if axes is None:
        axes = Figure(figsize=(10, 3.6), layout="constrained").subplots(1, 2)
    curves, hist = axes
    matrices = {kind: count_matrix(c) for kind, c in sets.items()}
    bins = np.histogram_bin_edges(np.concatenate([c[:, -1] for c in matrices.values()]), bins="auto")
    for kind, c in matrices.items():
        plot_layer_counts(c, ax=curves, label=kind, individual=False)
        plot_count_histogram(c, hist, bins=bins, label=kind)
    if target is not None:
        curves.axhline(target, color="0.5", ls=":")
    return curves.figure


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long sequences (nan for fewer than 2 points)."""
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 else float("nan")


def plot_complexity(complexity: Sequence[float], counts: CountsLike, names: Optional[Sequence[str]] = None,
                    kinds: Optional[Sequence[str]] = None, ax: Optional[Axes] = None) -> Axes:
    """Output tokens against image complexity (e.g. ``stats.jpeg_bytes_per_pixel``), one dot
    per image (coloured by ``kinds``, e.g. "synthetic" / "photo"), a least-squares line, and
    the Pearson correlation of all the dots in the title."""
    x = np.asarray(complexity, dtype=np.float64)
    y = count_matrix(counts)[:, -1].astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} complexity values for {len(y)} images; give one per image")
    labels = image_names(names, len(y))
    kinds = list(kinds) if kinds is not None else ["images"] * len(y)
    ax = new_axes(ax)
    for kind in dict.fromkeys(kinds):
        chosen = np.array([k == kind for k in kinds])
        ax.scatter(x[chosen], y[chosen], label=kind, s=25)
    for xi, yi, name in zip(x, y, labels):
        ax.annotate(name, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(x) > 1 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 2)
        ax.plot(grid, slope * grid + intercept, color="0.4", lw=1, ls="--")
    ax.set_title(f"Pearson r = {correlation(x, y):.3f} (n = {len(y)})", fontsize=10)
    ax.set_xlabel("complexity (JPEG bytes per pixel)")
    ax.set_ylabel("output tokens")
    ax.legend(fontsize=8)
    return ax


def threshold_curve(thresholds: ThresholdsLike) -> np.ndarray:
    """(L,) tau per block, nan where the block never merges (r_i = 0 or tau = +inf)."""
    if isinstance(thresholds, Thresholds):
        values = np.array(thresholds.values, dtype=np.float64)
        values[np.array(thresholds.r) == 0] = np.nan
    else:
        values = np.array(list(thresholds), dtype=np.float64)
    values[~np.isfinite(values)] = np.nan
    return values


def plot_thresholds(thresholds: Union[ThresholdsLike, Mapping[str, ThresholdsLike]], ax: Optional[Axes] = None) -> Axes:
    """Threshold profile: tau per block, one line per calibration (pass a dict name ->
    thresholds to overlay several). Blocks that never merge are gaps. Blocks count from 1, so
    tau at x = k decides the drop to the count plotted at x = k by the count plots."""
    named = dict(thresholds) if isinstance(thresholds, Mapping) else {"thresholds": thresholds}
    ax = new_axes(ax)
    for name, th in named.items():
        values = threshold_curve(th)
        off = int(np.isnan(values).sum())
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3,
                label=name + (f" ({off} blocks never merge)" if off else ""))
    ax.set_xlabel("block")
    ax.set_ylabel("τ (cosine similarity)")
    ax.legend(fontsize=8)
    return ax


def plot_physical_virtual(result: EncoderResult, names: Optional[Sequence[str]] = None, ax: Optional[Axes] = None,
                          mlp_ratio: float = 4.0) -> Axes:
    """Per image, the patch positions a VLM sees with virtual token unmerging (light bar:
    all patches) against the physical tokens the encoder outputs (dark bar), labelled with
    the share of the unmerged encoder's FLOPs that was spent (``stats.token_accounting``)."""
    acc = token_accounting(result, mlp_ratio)
    texts = [f"{p}/{v}, {100 * f:.0f}% FLOPs" for p, v, f in zip(acc["physical"], acc["virtual"], acc["encoder_flops"])]
    return paired_bars(ax, image_names(names, len(texts)), acc["virtual"], acc["physical"],
                       ("virtual (positions seen by the LLM)", "physical (encoder output)"), texts, "C2", "patch tokens")


Accounting = Sequence[Mapping[str, int]]
VLM_BARS = (("llm_virtual_length", "LLM virtual length (positions, as unmerged)", "0.85"),
            ("llm_compact_length", "LLM compact length (tokens computed)", "lightsteelblue"),
            ("image_tokens", "image tokens (physical)", "C0"))


def vlm_rows(accounting: Union[Accounting, Mapping[str, Accounting]],
             names: Optional[Sequence[str]]) -> tuple[list[str], list[Mapping[str, int]]]:
    """(row labels, per-sample dicts): one row per sample, or for {label: accounting} one row
    per sample and label, grouped by sample ("name · label")."""
    if not isinstance(accounting, Mapping):
        return image_names(names, len(accounting)), list(accounting)
    runs = {label: list(acc) for label, acc in accounting.items()}
    n = {len(acc) for acc in runs.values()}
    if len(n) != 1:
        raise ValueError(f"runs hold different numbers of samples ({sorted(n)}); compare runs over the same samples")
    samples = image_names(names, n.pop())
    rows = [(f"{name} · {label}", acc[b]) for b, name in enumerate(samples) for label, acc in runs.items()]
    return [r[0] for r in rows], [r[1] for r in rows]


def vlm_text(acc: Mapping[str, int]) -> str:
    """"img physical/virtual · LLM compact/virtual[ · KV entries, MiB]" for one sample; the
    decode-fast cache's key entries (one per virtual slot) are named when they differ from its
    value entries."""
    text = (f"img {acc['image_tokens']}/{acc['image_positions']} · "
            f"LLM {acc['llm_compact_length']}/{acc['llm_virtual_length']}")
    if "kv_cache_entries" in acc:
        text += f" · KV {acc['kv_cache_entries']}"
        keys = acc.get("kv_key_entries", acc["kv_cache_entries"])
        if keys != acc["kv_cache_entries"]:
            text += f" values + {keys} keys"
        if "kv_cache_bytes_per_sample_padded" in acc:
            text += f", {acc['kv_cache_bytes_per_sample_padded'] / 2 ** 20:.2f} MiB"
    return text


def plot_vlm_accounting(accounting: Union[Accounting, Mapping[str, Accounting]], names: Optional[Sequence[str]] = None,
                        ax: Optional[Axes] = None) -> Axes:
    """What a VLM run with DyMU computed, per sample (first on top): nested bars for the LLM's
    virtual length (the positions it attends over, as the unmerged model would), its compact
    length (the tokens it actually computes) and its physical image tokens; a black
    tick at the KV-cache entries, and a text "img physical/virtual · LLM compact/virtual · KV
    entries, MiB" (the KV bytes are per sample of the padded batch cache).

    accounting: the per-sample dicts of ``vlm.generate`` / ``vlm.chat`` / ``model.dymu_vlm.last``,
    or {label: such a list} over the same samples to compare runs (e.g. "vtu" / "compact" /
    "full"): then one row per sample and label."""
    labels, rows = vlm_rows(accounting, names)
    ax = new_axes(ax, (6.5, 1.1 + 0.32 * len(rows)))
    y = np.arange(len(rows))
    for key, label, color in VLM_BARS:
        ax.barh(y, [acc[key] for acc in rows], color=color, label=label)
    kv = [(yi, acc["kv_cache_entries"]) for yi, acc in zip(y, rows) if "kv_cache_entries" in acc]
    if kv:
        ax.scatter([x for _, x in kv], [yi for yi, _ in kv], marker="|", s=250, color="k", zorder=3,
                   label="KV-cache entries")
    longest = max(max(acc["llm_virtual_length"], acc.get("kv_cache_entries", 0)) for acc in rows)
    for yi, acc in zip(y, rows):
        ax.text(max(acc["llm_virtual_length"], acc.get("kv_cache_entries", 0)), yi, f" {vlm_text(acc)}",
                va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, longest * 1.8)
    ax.set_xlabel("tokens")
    legend_above(ax)
    return ax


def plot_stage_costs(rows: Sequence[Mapping[str, Any]], reference: str = "full", ax: Optional[Axes] = None) -> Axes:
    """Where the time goes (``vlm.costs.stage_costs`` rows, each with a ``setting`` and maybe a
    ``sample`` key): one stacked bar per row, vision / LLM prefill / decode seconds, labelled
    "sample · setting"; a row slower than the ``reference`` setting on its sample is marked
    "SLOWER than full" in red."""
    ax = new_axes(ax, (6.5, 1.1 + 0.32 * len(rows)))
    full = {r.get("sample"): r["total_s"] for r in rows if r["setting"] == reference}
    y = np.arange(len(rows))
    left = np.zeros(len(rows))
    for stage, color in zip(("vision", "prefill", "decode"), ("tab:orange", "tab:blue", "tab:green")):
        seconds = np.array([r[f"{stage}_s"] for r in rows])
        ax.barh(y, seconds, left=left, color=color, label=f"{stage} s")
        left += seconds
    for yi, r in zip(y, rows):
        base = full.get(r.get("sample"))
        slower = base is not None and r["total_s"] > base
        note = f" {r['total_s']:.3g} s" + (f" ({r['total_s'] / base:.2f}x)" if base else "") + (
            " SLOWER than full" if slower else "")
        ax.text(r["total_s"], yi, note, va="center", fontsize=7, color="tab:red" if slower else "k")
    labels = [" · ".join(str(x) for x in (r.get("sample"), r["setting"]) if x is not None) for r in rows]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, left.max() * 1.6)
    ax.set_xlabel("seconds")
    legend_above(ax)
    return ax


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_eval_tradeoff(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy",
                       note: Optional[str] = None) -> Figure:
    """Benchmark runs (``dymu_viz.eval.run_rows``): the metric against mean image tokens (with
    the ± std bar), against seconds per sample and, when the rows have them, against GFLOPs per
    sample; one marker per setting, hollow and of falling size so that settings on one spot stay
    visible. note: a line over the figure (say so when the weights are random)."""
    panels = [("image_tokens", "image tokens per sample (mean ± std)"), ("seconds", "seconds per sample "
              "(share of its batch)")] + ([("gflops", "GFLOPs per sample")] if all("gflops" in r for r in rows) else [])
    fig = Figure(figsize=(4.4 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    for k, r in enumerate(rows):
        colour = next_colour(axes[0])
        style = dict(marker=MARKERS[k % len(MARKERS)], markersize=11 - 1.5 * min(k, 4), markerfacecolor="none",
                     markeredgewidth=1.8, color=colour, linestyle="none")
        for ax, (key, _) in zip(axes, panels):
            xerr = r["image_tokens_std"] if key == "image_tokens" else None
            ax.errorbar(r[key], r[metric], xerr=xerr, capsize=3, label=r["setting"], **style)
    axes[0].legend(fontsize=8)  # matched budgets share a spot: a legend, not labels on top of each other
    for ax, (_, label) in zip(axes, panels):
        ax.set_xlabel(label)
    axes[0].set_ylabel(metric)
    if note:
        fig.suptitle(note, fontsize=10, color="tab:red")
    return fig


def plot_token_extremes(counts: Sequence[float], images: Sequence[Any], names: Optional[Sequence[str]] = None,
                        label: str = "image tokens") -> Figure:
    """The distribution of per-sample token counts, and the samples with the fewest, the median
    and the most tokens as thumbnails (the paper's Fig. 7 style)."""
    counts = np.asarray(counts, dtype=float)
    if not counts.size:
        raise ValueError("no token counts: the image set is empty")
    names = image_names(names, len(counts))
    order = np.argsort(counts, kind="stable")
    picks = {"fewest": order[0], "median": order[len(order) // 2], "most": order[-1]}
    fig = Figure(figsize=(13, 3.4), layout="constrained")
    hist, *thumbs = fig.subplots(1, 4, width_ratios=[1.6, 1, 1, 1])
    hist.hist(counts, bins="auto", color="tab:blue", alpha=0.7)
    hist.set_xlabel(label)
    hist.set_ylabel("samples")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    hist.set_title(f"{counts.mean():.1f} ± {counts.std():.1f} (n={len(counts)})", fontsize=9)
    for ax, (kind, i) in zip(thumbs, picks.items()):
        hist.axvline(counts[i], color="0.3", ls=":")
        ax.imshow(np.asarray(images[i]))
        ax.set_title(f"{kind}: {names[i]}, {counts[i]:g}", fontsize=9)
        ax.axis("off")
    return fig


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """A figure as PNG bytes (for image widgets and files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
