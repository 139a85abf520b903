"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): AnyRes crops through the
batched DToMe tower, and the *vanilla* OneVision layout (base crop, then the unpadded tile grid
with a newline token after every row) as the virtual sequence.

The layout is obtained by running HF's own ``pack_image_features`` on compact-row *indices*
instead of features: reshaping, unpadding and flattening only move entries, so every virtual
slot comes out holding the compact row it copies, and newline slots come out as -1. Each newline
becomes its own compact token. Compact rows that no slot copies (tokens of the padding that
unpadding removes) are dropped. With no merging this reproduces vanilla OneVision exactly.

Large images: when the unpadded grid exceeds ``anyres_max_N`` tiles' worth of tokens, OneVision
shrinks it with bilinear interpolation, so a slot can blend up to four grid tokens. The index
pass carries a second channel, index², and a slot whose blend has zero variance copies a single
compact row as above. A slot that blends *different* compact rows (it straddles a group border)
becomes a compact token of its own, holding exactly the feature vanilla OneVision computes from
the merged tower's output. So the layout stays exact -- with no merging it is vanilla OneVision --
and the cost is one extra compact token per border-straddling slot.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .common import ImageTokens, tower_features

NEWLINE = -1.0
MIXED = 1e-6  # index variance above which a downsampled slot blends different compact rows


def onevision_images(model: nn.Module, pixel_values: Tensor, image_sizes: Optional[Tensor] = None,
                     batch_num_images: Optional[Tensor] = None, **kwargs: Any) -> list[ImageTokens]:
    """Per image: compact features (n, D) -- every crop's merged tokens, one token per newline and
    one per blended slot -- and the mapping (V_img,) from each vanilla-layout position to its
    compact row. batch_num_images: images per sample; as in HF, an image of a sample with
    several images is its base crop only (no AnyRes tiles)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if image_sizes is None:
        raise ValueError("LLaVA-OneVision needs image_sizes (the original (H, W) of every image)")
    cfg = model.config
    tiled = [True] * len(image_sizes) if batch_num_images is None else \
        [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(tiled) != len(image_sizes):
        raise ValueError(f"batch_num_images counts {len(tiled)} images but image_sizes has {len(image_sizes)}")
    n_crops = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if tile else 1
               for size, tile in zip(image_sizes, tiled)]
    if pixel_values.dim() != 5:
        raise ValueError(f"LLaVA-OneVision pixel_values must be (images, crops, 3, H, W), got {tuple(pixel_values.shape)}")
    crops = torch.cat([pix[:n] for pix, n in zip(pixel_values, n_crops)])
    per_crop = tower_features(model, crops)
    out, first = [], 0
    for i, n in enumerate(n_crops):
        segments = per_crop[first:first + n]
        first += n
        feats = torch.cat([f for f, _ in segments])
        offsets = torch.tensor([0] + [len(f) for f, _ in segments[:-1]], device=feats.device).cumsum(0)
        grid = torch.stack([m + o for (_, m), o in zip(segments, offsets)])  # (crops, positions) compact rows
        powers = torch.tensor([1.0, 2.0], dtype=torch.float64, device=grid.device)
        newline_index = torch.tensor([NEWLINE, NEWLINE ** 2], dtype=torch.float64, device=grid.device)
        slots = _pack(model, grid.to(torch.float64)[..., None] ** powers, image_sizes[i], newline_index)
        index, variance = slots[:, 0], slots[:, 1] - slots[:, 0] ** 2
        newline, mixed = index == NEWLINE, variance > MIXED
        mapping = index.round().long()
        own = newline | mixed  # slots that get a compact token of their own, in slot order
        if mixed.any():  # bilinear downsampling blended different rows: vanilla's blend, as it is
            extra = _pack(model, feats[grid], image_sizes[i], model.model.image_newline)[own]
        else:
            extra = model.model.image_newline.to(feats.dtype)[None].expand(int(own.sum()), -1)
        mapping[own] = len(feats) + torch.arange(int(own.sum()), device=mapping.device)
        used, mapping = torch.unique(mapping, return_inverse=True)  # drop rows no slot copies (unpadded away)
        image = ImageTokens(torch.cat([feats, extra])[used], mapping, [len(f) for f, _ in segments])
        out.append(image.in_slot_order())
    return out


def _pack(model: nn.Module, grid: Tensor, image_size: Tensor, newline: Tensor) -> Tensor:
    """HF's vanilla packing of one image's crops (crops, positions, C) -> (slots, C)."""
    packed, _ = model.model.pack_image_features([grid], image_size[None], image_newline=newline,
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0]
