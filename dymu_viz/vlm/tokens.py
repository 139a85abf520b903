"""``ImageTokens``: the one thing a VLM family hands the pipeline for each image (or video).

An image in the LLM is its *compact* features (one row per merged token) plus a mapping from
every *virtual* image position (the positions the unpatched model would use, in its order) to
the compact row that stands there. Compact rows are kept in the order of their first virtual
position, so with no merging the compact sequence is the unpatched one, in every mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class ImageTokens:
    """features: (n, D) compact rows; mapping: (V_img,) virtual image position -> compact row;
    crop_tokens: tokens the tower returned per crop (one crop for a plain image; base crop then
    tiles for AnyRes; the units for towers that merge after their output; InternVL3: each tile's
    compact tokens after its rounds, so per-tile counts show in the accounting); extras: (n, k, D)
    per compact row, what the family adds to the LLM's first k layers at the image's rows
    (Qwen3-VL's DeepStack features, merged with the same groups), or None; tower_tokens: its
    units entering the ViT, then its tokens after each block, when the tower merged whole units
    (``unit_tower``), else None."""

    features: Tensor
    mapping: Tensor
    crop_tokens: list[int]
    extras: Optional[Tensor] = None
    tower_tokens: Optional[list[int]] = None

    def to(self, device: torch.device) -> "ImageTokens":
        """The same image with its mapping (and rows) on ``device``: where the LLM lays it out."""
        return ImageTokens(self.features, self.mapping.to(device), self.crop_tokens, self.extras, self.tower_tokens)

    def in_slot_order(self) -> "ImageTokens":
        """The same image with compact rows sorted by their first virtual position (every row
        is used by some position)."""
        n = len(self.features)
        slots = torch.arange(len(self.mapping), device=self.mapping.device)
        first = torch.full((n,), len(self.mapping), device=self.mapping.device, dtype=torch.long)
        first = first.scatter_reduce(0, self.mapping, slots, reduce="amin")
        order = first.argsort()
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=order.device))
        return ImageTokens(self.features[order], rank[self.mapping], self.crop_tokens,
                           None if self.extras is None else self.extras[order], self.tower_tokens)
