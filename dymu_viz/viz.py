"""Matplotlib pictures of what DToMe merged. Functions take results, never model internals."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from .encoder import EncoderResult


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
    """(mean, std) of a torchvision Compose's Normalize step, or (None, None)."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(t.mean), tuple(t.std)
    return None, None


def group_borders(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour belongs to another group."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def merge_map(image: np.ndarray, patch_groups: np.ndarray, border: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """ToMe-style map: every merged group filled with its mean colour, groups outlined.

    image: (H, W, 3) uint8 covering the patch grid exactly; patch_groups: (gh, gw) group ids.
    Returns an (H, W, 3) uint8 image."""
    gh, gw = patch_groups.shape
    H, W = image.shape[:2]
    if H % gh or W % gw:
        raise ValueError(f"image {H}x{W} is not a whole number of {gh}x{gw} patches")
    labels = np.kron(patch_groups, np.ones((H // gh, W // gw), dtype=patch_groups.dtype))
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape)
    counts = np.bincount(dense.ravel())
    out = np.empty_like(image)
    for c in range(3):
        means = np.bincount(dense.ravel(), weights=image[..., c].ravel().astype(np.float64)) / counts
        out[..., c] = np.round(means[dense]).astype(np.uint8)
    out[group_borders(labels)] = border
    return out


def plot_merge_maps(images: Sequence[np.ndarray], result: EncoderResult, titles: Optional[Sequence[str]] = None,
                    layers: Sequence[int] = (-1,)) -> Figure:
    """One row per image: the input, then its merge map at each requested layer, titled with
    the token count there."""
    n, cols = len(images), 1 + len(layers)
    fig = Figure(figsize=(2.6 * cols, 2.8 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    counts = result.counts.cpu()
    for b, image in enumerate(images):
        axes[b, 0].imshow(image)
        axes[b, 0].set_title(titles[b] if titles else f"image {b}", fontsize=9)
        for j, layer in enumerate(layers, start=1):
            groups = result.patch_groups(layer)[b].cpu().numpy()
            axes[b, j].imshow(merge_map(image, groups))
            shown = layer if layer >= 0 else counts.shape[1] + layer
            axes[b, j].set_title(f"after layer {shown}: {int(counts[b, layer])} tokens", fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig
