"""What every VLM family shares: the DToMe tower pass up to the feature layer, and the
``ImageTokens`` a family turns each image into.

An image in the LLM is its *compact* features (one row per merged token) plus a mapping from
every *virtual* image position (the positions the unpatched model would use, in its order) to
the compact row that stands there. Compact rows are kept in the order of their first virtual
position, so with no merging the compact sequence is the unpatched one, in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..patch import encode, get_state
from .baselines import Pool, pool_patches


@dataclass
class ImageTokens:
    """features: (n, D) compact rows; mapping: (V_img,) virtual image position -> compact row;
    crop_tokens: tokens the tower returned per crop (one crop for LLaVA-1.5; base crop then
    tiles for OneVision)."""

    features: Tensor
    mapping: Tensor
    crop_tokens: list[int]

    def in_slot_order(self) -> "ImageTokens":
        """The same image with compact rows sorted by their first virtual position (every row
        is used by some position)."""
        n = len(self.features)
        slots = torch.arange(len(self.mapping), device=self.mapping.device)
        first = torch.full((n,), len(self.mapping), device=self.mapping.device, dtype=torch.long)
        first = first.scatter_reduce(0, self.mapping, slots, reduce="amin")
        order = first.argsort()
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
        return ImageTokens(self.features[order], rank[self.mapping], self.crop_tokens)


ImageSegments = list[tuple[Tensor, Tensor]]


def tower_features(model: nn.Module, pixels: Tensor) -> ImageSegments:
    """Per input image (or crop): (compact features (n, D) after the projector, mapping from
    each of its positions -- patches, plus CLS with the "full" strategy -- to its compact row).
    The DToMe tower runs batched, up to ``vision_feature_layer`` and no further."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError("DyMU supports a single vision_feature_layer")
    tower = model.model.vision_tower
    depth = get_state(tower).adapter.depth
    if not -depth - 1 <= layer <= depth:
        raise ValueError(f"vision_feature_layer {layer} does not exist in a {depth}-layer vision tower")
    blocks = layer % (depth + 1)  # hidden state `layer` is the output of this many blocks
    result = encode(tower, pixels.to(next(tower.parameters()).dtype), blocks=blocks)
    hidden, groups, sizes = result.tokens, result.groups, result.sizes  # the last block run is the one read
    state = model.__dict__.get("dymu_vlm")
    if state is not None and state.pool is not None:  # the pooling baseline (the tower merged nothing)
        hidden, groups, sizes = pooled_tower_output(hidden, get_state(tower).adapter.protected, state.pool)
    first = 1 if cfg.vision_feature_select_strategy == "default" else 0  # "default" drops CLS
    projected = model.model.multi_modal_projector(hidden[:, first:])  # one batched call; padding rows unused
    counts = ((sizes > 0).sum(-1) - first).tolist()
    return [(projected[b, :n], groups[b, first:] - first) for b, n in enumerate(counts)]


def pooled_tower_output(hidden: Tensor, lead: int, pool: Pool) -> tuple[Tensor, Tensor, Tensor]:
    """The pooling baseline on an unmerged tower output (B, lead + side^2, C), ``lead`` CLS-like
    tokens first: (B, lead + rows * cols, C) with the leading tokens kept, groups (B, lead +
    side^2) and sizes (B, lead + rows * cols) in the encoder's conventions."""
    cells, cell_of = pool_patches(hidden[:, lead:], pool.rows, pool.cols)
    B, device = hidden.shape[0], hidden.device
    groups = torch.cat([torch.arange(lead, device=device), cell_of + lead]).expand(B, -1)
    sizes = torch.bincount(groups[0], minlength=lead + pool.rows * pool.cols).expand(B, -1)
    return torch.cat([hidden[:, :lead], cells], 1), groups, sizes


def llava_images(model: nn.Module, pixel_values: Tensor, **kwargs: object) -> list[ImageTokens]:
    """LLaVA-1.5: one image, one tower pass; the virtual image is its patch grid."""
    if pixel_values.dim() != 4:
        raise ValueError(f"LLaVA pixel_values must be (images, 3, H, W), got {tuple(pixel_values.shape)}")
    return [ImageTokens(f, m, [len(f)]).in_slot_order() for f, m in tower_features(model, pixel_values)]
