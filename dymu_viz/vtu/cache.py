"""What a VTU KV cache holds, in bytes: the two policies' formula and a cache's own tensors."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def cache_bytes_formula(policy: str, layers: int, rows: int, kv_heads: int, head_dim: int, compact: int,
                        virtual: int, element_size: int) -> int:
    """Bytes of a VTU KV cache: "compact" keeps keys and values of the compact tokens,
    2 * layers * rows * kv_heads * compact * head_dim * element_size; "decode_fast" keeps keys of
    the virtual slots and values of the compact tokens, layers * rows * kv_heads * (virtual +
    compact) * head_dim * element_size, i.e. (virtual + compact) / (2 virtual) of the unmerged
    model's. compact / virtual: per row, padding included."""
    per_row = {"compact": 2 * compact, "decode_fast": virtual + compact}[policy]
    return layers * rows * kv_heads * per_row * head_dim * element_size


def cache_bytes(cache: Any) -> int:
    """Bytes held by a transformers Cache's key and value tensors."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total
