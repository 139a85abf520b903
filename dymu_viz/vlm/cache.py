"""The KV cache of a DyMU-patched VLM: compact entries, counted in the prompt's own coordinates.

HF's ``generate`` keeps its bookkeeping (``input_ids``, ``attention_mask``, how much of a
continued prompt is new) in the coordinates of the processor's input, where every image is its
full run of placeholders. Under DyMU the cache holds one entry per *compact* token. A
``DyMUCache`` is the ``DynamicCache`` that ``generate`` (or the model) created, its class swapped
at the first DyMU forward: its entries are compact, ``get_seq_length()`` answers in input
coordinates (compact entries + ``offset``), and it carries the generation's ``GenerationState``
(compact attention mask, virtual layout), which follows the cache's rows when beam search
reorders them. Only the dynamic cache can work this way: a static cache addresses entries by
input position, so it is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor
from transformers import DynamicCache

from ..vtu import VTUTrack


@dataclass
class GenerationState:
    """compact_mask: (B, P) 1 for the compact tokens in the cache, 0 for padding; offset: input
    tokens consumed minus compact entries held; track: the virtual sequence (VTU mode only);
    next_rope: (B,) the M-RoPE position the next token of each row takes (Qwen2-VL only)."""

    compact_mask: Tensor
    offset: int = 0
    track: Optional[VTUTrack] = None
    next_rope: Optional[Tensor] = None

    @property
    def n_compact(self) -> int:
        return self.compact_mask.shape[1]

    def select_rows(self, index: Tensor) -> None:
        self.compact_mask = self.compact_mask[index.to(self.compact_mask.device)]
        if self.next_rope is not None:
            self.next_rope = self.next_rope[index.to(self.next_rope.device)]
        if self.track is not None:
            self.track.select_rows(index)


class DyMUCache(DynamicCache):
    """A ``DynamicCache`` holding a DyMU generation (see the module docstring)."""

    dymu: GenerationState

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.compact_length() + self.dymu.offset

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Where HF's mask functions place a forward's first query among the cached entries: after
        the compact entries (``get_seq_length`` counts input positions, for ``generate``)."""
        return self.compact_length()

    def compact_length(self) -> int:
        """Compact tokens held per row (the values' length: with VTU's decode-fast policy the keys
        are held per virtual slot)."""
        layer = self.layers[0] if self.layers else None
        return 0 if layer is None or not layer.is_initialized else layer.values.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.dymu.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        rows = self.dymu.compact_mask.shape[0]
        self.dymu.select_rows(torch.arange(rows, device=self.dymu.compact_mask.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.dymu.select_rows(indices)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a DyMU cache cannot be cropped: its entries are compact tokens, not input positions "
                                  "(assisted decoding and prompt-lookup decoding are not supported with DyMU)")


def adopt(cache: Any, batch: int, device: torch.device) -> DyMUCache:
    """The DyMU cache for this forward: ``cache`` itself (a fresh ``DynamicCache`` becomes a
    ``DyMUCache`` in place, so ``generate`` keeps using the same object), or a clear error."""
    if isinstance(cache, DyMUCache):
        return cache
    if type(cache) is not DynamicCache:
        raise ValueError(f"DyMU needs the dynamic KV cache (transformers' DynamicCache, generate's default); got "
                         f"{type(cache).__name__}. A static or offloaded cache addresses entries by input position, "
                         "while DyMU's cache holds compact tokens: drop cache_implementation / pass no cache")
    if cache.get_seq_length() > 0:
        raise ValueError("this DynamicCache was filled by a model without DyMU; start from an empty cache")
    cache.__class__ = DyMUCache
    cache.dymu = GenerationState(torch.zeros((batch, 0), dtype=torch.long, device=device))
    return cache
