"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): AnyRes crops through the
batched DToMe tower, and the *vanilla* OneVision layout (base crop, then the unpadded tile grid
with a newline token after every row) as the virtual sequence.

The layout is obtained by running HF's own ``pack_image_features`` on compact-row *indices*
instead of features: reshaping, unpadding and flattening only move entries, so every virtual
slot comes out holding the compact row it copies, and newline slots come out as -1. Each newline
becomes its own compact token. With no merging this reproduces vanilla OneVision exactly.

Not covered yet: grids large enough for OneVision to downsample them bilinearly (``ratio > 1.1``
under ``anyres_max_N``), where a virtual slot would blend several tokens; these raise.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

NEWLINE = -1.0


def onevision_images(model: nn.Module, pixel_values: Tensor, image_sizes: Optional[Tensor] = None,
                     **kwargs: Any) -> list[tuple[Tensor, Tensor]]:
    """Per image: (compact features (n, D): every crop's merged tokens, then one token per
    newline; mapping (V_img,) from each vanilla-layout position to its compact row)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from .pipeline import tower_features

    if image_sizes is None:
        raise ValueError("LLaVA-OneVision needs image_sizes (the original (H, W) of every image)")
    cfg = model.config
    n_crops = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
               for size in image_sizes]
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
        index = torch.stack([m + o for (_, m), o in zip(segments, offsets)]).to(torch.float64)[..., None]
        packed, _ = model.model.pack_image_features(
            [index], image_sizes[i:i + 1], image_newline=torch.tensor([NEWLINE], dtype=torch.float64),
            vision_aspect_ratio=cfg.vision_aspect_ratio)
        slots = packed[0][:, 0]
        if not torch.equal(slots, slots.round()):
            raise NotImplementedError(
                f"image {i} ({image_sizes[i].tolist()}) is large enough for LLaVA-OneVision to downsample its "
                "tile grid bilinearly; DyMU's virtual layout does not cover that case yet")
        newline = slots == NEWLINE
        mapping = slots.long()
        mapping[newline] = len(feats) + torch.arange(int(newline.sum()), device=mapping.device)
        newlines = model.model.image_newline.to(feats.dtype)[None].expand(int(newline.sum()), -1)
        out.append((torch.cat([feats, newlines]), mapping))
    return out
