"""VTU's data: which compact token every virtual slot copies, and one generation's track of
them (``VirtualLayout``, ``VTUTrack``). No model code here.

Shapes: B samples, V virtual slots (padded per batch), P compact tokens, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class VirtualLayout:
    """src, pos: (B, V) long; valid: (B, V) bool. Invalid slots are left padding. ``pos`` is the
    slot order, which decides causality and sliding windows; it increases along each row (the
    constructors guarantee it). rope_pos: (3, B, V) long, the multimodal RoPE position (t, h, w)
    of every slot for M-RoPE models (Qwen2-VL, Qwen2.5-VL), which need not be monotone; None
    when the RoPE position is ``pos`` itself."""

    src: Tensor
    pos: Tensor
    valid: Tensor
    rope_pos: Optional[Tensor] = None

    @classmethod
    def from_mappings(cls, mappings: Sequence[Tensor]) -> "VirtualLayout":
        """One 1-D mapping per sample: virtual position v -> compact index (positions 0..V_b-1)."""
        longest = max(len(m) for m in mappings)
        device = mappings[0].device
        src = torch.zeros((len(mappings), longest), dtype=torch.long, device=device)
        pos = torch.zeros_like(src)
        valid = torch.zeros_like(src, dtype=torch.bool)
        for b, m in enumerate(mappings):
            n = len(m)
            src[b, longest - n:] = m
            pos[b, longest - n:] = torch.arange(n, device=device)
            valid[b, longest - n:] = True
        return cls(src, pos, valid)

    @classmethod
    def identity(cls, attention_mask: Tensor) -> "VirtualLayout":
        """Every valid compact token once, at consecutive positions (no merging)."""
        return cls.from_mappings([row.nonzero().squeeze(1) for row in attention_mask.bool()])

    @property
    def lengths(self) -> Tensor:
        """(B,) virtual length per sample."""
        return self.valid.sum(-1)

    def rope_positions(self) -> Tensor:
        """(3, B, V): the RoPE position rows of every slot (``pos`` three times for 1-D RoPE)."""
        return self.rope_pos if self.rope_pos is not None else self.pos.expand(3, -1, -1)

    def to(self, device: torch.device) -> "VirtualLayout":
        if self.src.device == device:
            return self
        return VirtualLayout(self.src.to(device), self.pos.to(device), self.valid.to(device),
                             None if self.rope_pos is None else self.rope_pos.to(device))

    def select_rows(self, index: Tensor) -> "VirtualLayout":
        """The layout of rows ``index`` (beam reordering, batch expansion)."""
        return VirtualLayout(self.src[index], self.pos[index], self.valid[index],
                             None if self.rope_pos is None else self.rope_pos[:, index])

    def append(self, block: "VirtualLayout") -> "VirtualLayout":
        """This layout followed by ``block`` (whose positions and compact indices are global)."""
        rope = None if self.rope_pos is None and block.rope_pos is None else \
            torch.cat([self.rope_positions(), block.rope_positions()], 2)
        return VirtualLayout(torch.cat([self.src, block.src], 1), torch.cat([self.pos, block.pos], 1),
                             torch.cat([self.valid, block.valid], 1), rope)

    def next_positions(self) -> Tensor:
        """(B,) the slot order position after each row's last slot."""
        return torch.where(self.valid, self.pos, -1).amax(-1) + 1

    def next_rope_positions(self) -> Tensor:
        """(B,) the RoPE position a token appended to each row takes (in all three rows for
        M-RoPE): one past the largest position of the row's slots, HF's rule for text after an
        image."""
        return torch.where(self.valid, self.rope_positions(), -1).amax(dim=(0, 2)) + 1


def is_identity(block: VirtualLayout, first: int, n: int) -> bool:
    """Whether block, n compact tokens from compact index first on, has one slot per token, in
    order: slot v copies row first + v (padding slots aside). One host sync."""
    if block.src.shape[1] != n:
        return False
    expected = torch.arange(first, first + n, device=block.src.device)
    return bool(((block.src == expected) | ~block.valid).all())


class VTUTrack:
    """One generation's virtual sequence: the layout of every compact token fed so far, how many
    compact tokens it covers, how many trailing slots hold the newest tokens (the queries of the
    current forward), and the RoPE cos / sin of every slot (extended as slots are appended). It
    lives with its KV cache (see ``dymu_viz.vlm``) and follows the cache's rows when beam search
    reorders them."""

    def __init__(self, layout: VirtualLayout, n_compact: int):
        self.layout, self.n_compact, self.query_slots = layout, n_compact, layout.src.shape[1]
        self.unfed = n_compact  # compact tokens appended but not fed to the decoder yet
        self.unpadded = bool(layout.valid.all())
        self.identity = is_identity(layout, 0, n_compact)  # slot v copies compact row v (nothing merged)
        self.checked = False  # the newest slots were checked to point at the newest tokens
        self.plain_tail = False  # the newest slots are plain tokens, one slot each, in order
        empty = torch.zeros(layout.src.shape[0], dtype=torch.long, device=layout.src.device)
        self.next_pos = layout.next_positions() if layout.src.shape[1] else empty  # slot order
        self.next_rope = layout.next_rope_positions() if layout.src.shape[1] else empty  # RoPE position
        self.rope_chunks: list[tuple[Tensor, Tensor]] = []  # cos, sin (B, slots, D) of consecutive slots
        self.rope_done = 0  # slots whose cos / sin are computed
        self.per_forward: dict[Any, Any] = {}  # what every layer of the current forward shares
        self.buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # see ``scratch``

    def scratch(self, like: Tensor, numel: int) -> Tensor:
        """A flat tensor of numel elements in like's dtype and device that the layers of every
        forward of this generation reuse (each layer is done with it before the next starts):
        on a CPU a fresh tensor of a decode step's size costs page faults at every layer, which
        cost as much as the work on it. Grown with headroom for the slots decode steps add."""
        key = (like.device, like.dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = like.new_empty(numel + numel // 4)
        return buffer[:numel]

    def append(self, block: VirtualLayout, n_new: int) -> None:
        """Add ``n_new`` compact tokens whose virtual slots are ``block`` (the newest queries)."""
        self.identity = self.identity and is_identity(block, self.n_compact, n_new)
        self.layout = self.layout.append(block)
        self.n_compact += n_new
        self.unfed += n_new
        self.query_slots = block.src.shape[1]
        self.unpadded = self.unpadded and bool(block.valid.all())
        self.next_pos = torch.maximum(self.next_pos, block.next_positions())
        self.next_rope = torch.maximum(self.next_rope, block.next_rope_positions())
        self.checked = self.plain_tail = False
        self.per_forward = {}

    def append_plain(self, n_new: int) -> None:
        """Add n_new plain tokens to every row, each at the row's next virtual position: what a
        decode step adds."""
        B, device = self.layout.src.shape[0], self.layout.src.device
        steps = torch.arange(n_new, device=device)
        src = (self.n_compact + steps).expand(B, n_new)
        rope = None if self.layout.rope_pos is None else (self.next_rope[:, None] + steps).expand(3, B, n_new)
        self.layout = self.layout.append(VirtualLayout(src, self.next_pos[:, None] + steps,
                                                       torch.ones_like(src, dtype=torch.bool), rope))
        self.n_compact += n_new
        self.unfed += n_new
        self.query_slots = n_new
        self.next_pos, self.next_rope = self.next_pos + n_new, self.next_rope + n_new
        self.checked, self.plain_tail = True, True  # known valid: no check, no sync; padding unchanged
        self.per_forward = {}

    def select_rows(self, index: Tensor) -> None:
        """Keep rows ``index`` (in that order), as the KV cache does under beam search."""
        index = index.to(self.layout.src.device)
        self.layout = self.layout.select_rows(index)
        self.next_pos, self.next_rope = self.next_pos[index], self.next_rope[index]
        self.per_forward = {}
        self.rope_chunks = [(c[index.to(c.device)], s[index.to(s.device)]) for c, s in self.rope_chunks]

