"""Virtual token unmerging (VTU, spec section 5) for HF RoPE decoders, without copying any
modeling code.

The LLM runs on the *compact* sequence (each merged visual token once). Position-wise layers
(norms, projections, MLP) therefore see only the unique tokens. RoPE is made the identity in the
model (the rotary module returns cos = 1, sin = 0); while a decoder is patched, its modeling
module's apply_rotary_pos_emb hands q / k over in RoPE pair order instead of multiplying them by
1 (a head-dim permutation shared by q and k, so scores are unchanged). A registered attention
function then, in every layer:

    expands q / k / v to the virtual (full-length) sequence through the mapping,
    rotates them with their *virtual* positions,
    attends causally over the virtual positions (SDPA, eager, or the exact Eq. 10 kernel),
    averages the copies of each compact token back into one output row.

A decode step (one new token per row) skips the value expansion: its attention probabilities
over the virtual slots are summed into the compact tokens the slots copy and multiplied with
the compact values (or, when nothing is merged, one SDPA call over the cache as it is). Its new
token's q and k are rotated in the RoPE hook by one matrix product each. What the KV cache
keeps is a policy (``cache_bytes_formula``):

* "decode_fast" (default): keys of every virtual slot, rotated once when their token arrives
  (by the RoPE hook), and compact values: decode steps cost about the unmerged model's (less
  with many rows or few image tokens, where reading the smaller cache dominates);
* "compact": compact, un-rotated keys and values, the least memory; every decode step expands
  and rotates the keys again (slot index and rotation built once per step for all layers; on a
  CPU into a scratch buffer the layers share, rotated in place).

Sliding-window layers (Qwen2 with use_sliding_window) keep their window, measured in virtual
positions; their cache keeps every compact token.

Shapes: B samples, H query heads, Hkv key/value heads, P compact tokens, V virtual slots
(padded per batch), D head dim. A ``VirtualLayout`` says, per sample and virtual slot, which
compact token it copies (``src``), its RoPE position (``pos``) and whether it exists (``valid``);
rows are left-padded so that decode steps append at the end.
"""

from __future__ import annotations

import collections
import functools
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_NAME = "dymu_vtu"
KERNELS = ("sdpa", "eager", "exact")
BACKENDS = ("native", "torch_scatter")
CACHE_POLICIES = ("compact", "decode_fast")


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


class VTUState:
    """Shared by every attention layer of one patched LLM: the real rotary embedding, the kernel,
    the cache policy, and the track of the generation now running (set before each forward).
    ``routes`` counts the attention paths taken (see ``vtu_attention``), for inspection."""

    def __init__(self, rotary: Callable[..., tuple[Tensor, Tensor]], kernel: str = "sdpa", backend: str = "native",
                 cache: str = "decode_fast"):
        if kernel not in KERNELS:
            raise ValueError(f"unknown VTU kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown scatter backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if cache not in CACHE_POLICIES:
            raise ValueError(f"unknown VTU cache policy {cache!r}; choose one of {', '.join(CACHE_POLICIES)}")
        self.rotary = rotary
        self.kernel = kernel
        self.backend = backend
        self.cache = cache
        self.track: Optional[VTUTrack] = None
        self.pair_ordered = False  # the layer's q / k (and cached keys) come in pair order
        self.query_rotated = False  # the RoPE hook rotated the layer's q (a decode step)
        self.hook_seen = False  # the model's attention has called the hooked apply_rotary_pos_emb
        self.routes: collections.Counter[str] = collections.Counter()
        self.rotate_half_checked = False

    def without_rope_hook(self) -> None:
        """The decode-fast cache keeps keys the RoPE hook expanded and rotated. A model whose
        attention never calls its modeling module's apply_rotary_pos_emb shows it at its first
        attention call, before any key was cached that way: switch to the compact cache then, and
        say so. Later (the hook worked before), a missing hook is an error."""
        if self.hook_seen:
            raise RuntimeError("the decode-fast VTU cache needs every attention call to go through the modeling "
                               "module's apply_rotary_pos_emb (it stores keys rotated there); this one did not")
        warnings.warn("this model's attention does not call its modeling module's apply_rotary_pos_emb, which the "
                      "decode-fast VTU cache needs; using cache='compact' (the same outputs, slower decode steps)",
                      stacklevel=3)
        self.cache = "compact"

    def start(self, layout: VirtualLayout, n_compact: int) -> VTUTrack:
        """A new generation whose (prefill) forward holds n_compact tokens per row laid out as
        ``layout``; returns its track (the current one from now on)."""
        self.track = VTUTrack(layout, n_compact)
        return self.track

    def begin_forward(self, q_len: int) -> None:
        """Called once per decoder forward (by the identity rotary): its q_len new tokens are the
        ones appended to the track, or, when none were (tokens fed to the decoder directly, such as
        decode steps), plain tokens at the next positions."""
        track = self.track
        if track is None:
            raise RuntimeError("VTU has no layout: run the model through a DyMU-patched VLM or call "
                               "state.start(layout, n_compact) before the forward")
        if track.unfed == 0:
            track.append_plain(q_len)
        elif track.unfed != q_len:
            raise RuntimeError(f"the VTU layout holds {track.unfed} new tokens but the forward feeds {q_len}")
        track.unfed = 0

    def step(self, kv_len: int, q_len: int) -> tuple[VirtualLayout, int, bool, bool]:
        """For a forward whose q_len newest compact tokens attend over kv_len cached ones: the
        layout, how many (trailing) slots hold the new tokens, whether no row is padded, and
        whether the new tokens are plain (one slot each, in order: decode steps). The one host
        sync (checking a layout given from outside) happens once per forward."""
        track = self.track
        if kv_len != track.n_compact:
            raise RuntimeError(f"the KV cache holds {kv_len} compact tokens but the VTU layout {track.n_compact}; "
                               "start a new layout for a new prompt")
        if not track.checked:
            q_src = track.layout.src[:, -track.query_slots:] - (kv_len - q_len)
            q_valid = track.layout.valid[:, -track.query_slots:]
            if not bool((((q_src >= 0) & (q_src < q_len)) | ~q_valid).all()):
                raise RuntimeError("VTU expects new tokens to be appended after the cached ones")
            track.checked = True
        return track.layout, track.query_slots, track.unpadded, track.plain_tail

    def _rope_new_slots(self, like: Tensor) -> None:
        """cos / sin of the slots appended since the last call, kept as the track's newest chunk.
        VTU supports rotate_half RoPE, whose two halves of D repeat the frequencies."""
        track = self.track
        if track.rope_done < track.layout.pos.shape[1]:
            layout, done = track.layout, track.rope_done
            positions = layout.pos[:, done:] if layout.rope_pos is None else layout.rope_pos[:, :, done:]
            cos, sin = self.rotary(like, positions.to(like.device))
            half = cos.shape[-1] // 2
            if not self.rotate_half_checked:  # a property of the model: checked once
                if not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:])):
                    raise ValueError("VTU supports rotate_half RoPE (HF's default: the same frequencies in both "
                                     "halves of the head dim); this model's rotary embedding differs")
                self.rotate_half_checked = True
            track.rope_chunks.append((cos, sin))
            track.rope_done = layout.pos.shape[1]

    def rope(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (B, V, D) of every slot of the track, in like's dtype and device; the slots
        appended since the last call are the only ones computed (the chunks are joined here)."""
        self._rope_new_slots(like)
        chunks = self.track.rope_chunks
        if len(chunks) > 1:
            first = chunks[0][0]
            chunks[:] = [tuple(torch.cat([chunk[i].to(first) for chunk in chunks], 1) for i in (0, 1))]
        cos, sin = chunks[0]
        return cos.to(like.device, like.dtype), sin.to(like.device, like.dtype)

    def rope_tail(self, like: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin (B, n, D) of the newest n slots, without joining the earlier chunks: a
        decode-fast step rotates only its own slot."""
        self._rope_new_slots(like)
        cos, sin = self.track.rope_chunks[-1]
        if cos.shape[1] < n:
            cos, sin = self.rope(like)
        return cos[:, -n:].to(like.device, like.dtype), sin[:, -n:].to(like.device, like.dtype)

    def plain_rotation(self, like: Tensor) -> Any:
        """The rotation of the newest (plain) slots, (B, 1, n, D/2), computed once per forward
        and shared by every layer."""
        key = ("plain_rotation", like.dtype, like.device)
        if key not in self.track.per_forward:
            cos, sin = self.rope_tail(like, self.track.query_slots)
            self.track.per_forward[key] = rotation(cos[:, None], sin[:, None])
        return self.track.per_forward[key]

    def step_matrix(self, like: Tensor) -> Tensor:
        """A decode step's RoPE and pair ordering as one matrix per row, (B, 1, D, D) (see
        ``rotation_matrix``): the new token's q and k each take one product instead of a copy
        into pair order and a rotation. Built once per forward and shared by every layer."""
        key = ("step_matrix", like.dtype, like.device)
        if key not in self.track.per_forward:
            self.track.per_forward[key] = rotation_matrix(*self.rope_tail(like, 1))
        return self.track.per_forward[key]

    def step_keys(self, key: Tensor, pair_ordered: bool) -> Tensor:
        """Compact cache, a decode step: the cached compact keys (B, Hkv, P, D) expanded to every
        virtual slot (no gather when nothing is merged) and rotated there, (B, Hkv, V, D) in pair
        order. The slot index and the rotation are built once per forward for every layer; on a
        CPU without autograd the slots are written into the track's scratch buffer and rotated in
        place (no allocation). With autograd on, they are fresh: the scores' backward keeps them
        (for the query's gradient even when the keys need none), so a later layer must not
        overwrite them."""
        if not pair_ordered:
            key = pair_order(key).flatten(-2)
        B, H, P, D = key.shape
        shared, cached = self.track.per_forward, ("step_keys", H, P, key.device, key.dtype)  # layers may differ
        if cached not in shared:
            src = self.track.layout.src.to(key.device)
            heads = torch.arange(B * H, device=key.device).view(B, H, 1) * P
            cos, sin = self.rope(key)
            shared[cached] = (heads + src[:, None, :]).reshape(-1), rotation(cos[:, None], sin[:, None])
        index, factor = shared[cached]
        V = index.numel() // (B * H)
        no_grad = not torch.is_grad_enabled()
        out = self.track.scratch(key, B * H * V * D).view(B, H, V, D // 2, 2) \
            if no_grad and key.device.type == "cpu" else None
        if self.track.identity:  # slot v is compact row v: rotated as they are, no gather
            slots = key.reshape(B, H, V, D // 2, 2)
        else:
            slots = torch.index_select(key.reshape(B * H * P, D), 0, index,
                                       out=None if out is None else out.view(-1, D)).view(B, H, V, D // 2, 2)
            out = slots if no_grad else None  # a copy of the keys (scratch or fresh): rotated in place
        if out is not None and isinstance(factor, Tensor):
            torch.mul(torch.view_as_complex(slots), factor, out=torch.view_as_complex(out))
            return out.view(B, H, V, D)
        return apply_rotation(slots, factor).view(B, H, V, D)

    def new_slot_keys(self, k: Tensor) -> Tensor:
        """Decode-fast cache: the new compact keys k (B, Hkv, q_len, D), pair order, expanded to
        the newest virtual slots and rotated there: (B, Hkv, slots, D), what the cache appends."""
        track, q_len = self.track, k.shape[2]
        n = track.query_slots
        if track.plain_tail:  # one slot per new token, in order: rotate in place of a gather
            return rotate_plain(k, self.plain_rotation(k))
        cos, sin = self.rope_tail(k, n)
        src = (track.layout.src[:, -n:].to(k.device) - (track.n_compact - q_len)).clamp(0, q_len - 1)
        return gather_rotated(k, src, cos, sin, pair_ordered=True)


def pair_order(x: Tensor) -> Tensor:
    """(..., D) -> (..., D/2, 2): each rotate_half pair (x_i, x_{i + D/2}) side by side, a view."""
    return x.unflatten(-1, (2, x.shape[-1] // 2)).transpose(-1, -2)


def natural_order(x: Tensor) -> Tensor:
    """Undo pair_order on a flattened head dim: (..., D) in pair order -> (..., D), a copy."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).transpose(-1, -2).flatten(-2)


def rotation(cos: Tensor, sin: Tensor) -> Any:
    """HF's RoPE as a factor for pair-ordered x: cos, sin (..., D) -> e^{i theta} (..., D/2),
    complex for float32 / float64 (one multiply), else the (cos, sin) halves (the real form:
    no complex half / bfloat16 product everywhere)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    return torch.complex(c, s) if cos.dtype in (torch.float32, torch.float64) else (c, s)


def rotation_matrix(cos: Tensor, sin: Tensor) -> Tensor:
    """HF's RoPE followed by pair ordering as one linear map: cos, sin (..., D) -> m (..., D, D)
    with x @ m = (x * cos + rotate_half(x) * sin) in pair order, for x (D,) in natural order:
    (x @ m)[2i] = x_i cos_i - x_{i+D/2} sin_i, (x @ m)[2i+1] = x_{i+D/2} cos_i + x_i sin_i."""
    D = cos.shape[-1]
    half = D // 2
    c, s = cos[..., :half], sin[..., :half]
    m = cos.new_zeros((*cos.shape[:-1], D * D))
    m[..., _rotation_entries(D, cos.device)] = torch.cat([c, -s, c, s], -1)
    return m.view(*cos.shape[:-1], D, D)


@functools.lru_cache(maxsize=8)
def _rotation_entries(D: int, device: torch.device) -> Tensor:
    """Where ``rotation_matrix`` puts cos, -sin, cos, sin in the flattened (D, D) matrix:
    (row, column) -> row * D + column."""
    i = torch.arange(D // 2, device=device)
    half = D // 2
    return torch.cat([i * D + 2 * i, (i + half) * D + 2 * i, (i + half) * D + 2 * i + 1, i * D + 2 * i + 1])


def rotate_by_matrix(x: Tensor, m: Tensor) -> Tensor:
    """x (B, H, n, D) in natural order (HF's q / k, laid out (B, n, H, D)), m (B, n, D, D) from
    ``rotation_matrix``: x rotated, in pair order, (B, H, n, D) laid out (B, n, H, D)."""
    return (x.transpose(1, 2) @ m).transpose(1, 2)


def apply_rotation(x: Tensor, factor: Any) -> Tensor:
    """x (..., D/2, 2) in pair order, rotated by a ``rotation`` factor broadcastable to (..., D/2)."""
    if isinstance(factor, Tensor):
        return torch.view_as_real(torch.view_as_complex(x) * factor)
    c, s = factor
    x1, x2 = x.unbind(-1)
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF's RoPE, x * cos + rotate_half(x) * sin, with x in pair order: x (..., D/2, 2) -> the
    same shape; cos, sin (..., D) broadcastable."""
    return apply_rotation(x, rotation(cos, sin))


def _flat_index(src: Tensor, n_rows: int) -> Tensor:
    """(B, V) per-sample row indices -> (B * V,) indices into the B * n_rows stacked rows."""
    return (src + n_rows * torch.arange(src.shape[0], device=src.device)[:, None]).reshape(-1)


def gather_slots(x: Tensor, src: Tensor) -> Tensor:
    """(B, H, P, D) compact rows -> (B, H, V, D) virtual slots, src: (B, V); one pass.

    HF's fresh q / k / v are (B, P, H, D) tensors seen as (B, H, P, D): one row copy of H * D
    values per slot, the result laid out (B, V, H, D), which SDPA takes as it is. A cache's
    tensors are (B, H, P, D): one row copy of D values per head and slot, the result laid out
    (B, H, V, D) like the cache, so that products with it need no further copy."""
    B, H, P, D = x.shape
    if x.transpose(1, 2).is_contiguous():
        rows, index = x.transpose(1, 2).reshape(B * P, H * D), _flat_index(src, P)
        return rows.index_select(0, index).view(B, -1, H, D).transpose(1, 2)
    heads = torch.arange(B * H, device=src.device).view(B, H, 1) * P
    index = (heads + src[:, None, :]).reshape(-1)  # (B, H, V) rows
    return x.reshape(B * H * P, D).index_select(0, index).view(B, H, -1, D)


def gather_rotated(x: Tensor, src: Tensor, cos: Tensor, sin: Tensor, pair_ordered: bool = False) -> Tensor:
    """RoPE'd virtual slots of compact q or k: x (B, H, P, D) -> (B, H, V, D); src (B, V);
    cos, sin (B, V, D) per slot.

    The result has each head's dims in pair order (x_0, x_{D/2}, x_1, x_{D/2+1}, ...): a
    permutation of the head dim shared by q and k, so every q . k (and SDPA) is unchanged.
    pair_ordered: x is already in pair order (what VTU's RoPE hook hands over, cache included);
    otherwise it is put in pair order first, one copy at compact length. Then the virtual
    slots take one gather and one complex multiply instead of a gather and three RoPE passes."""
    B, H, P, D = x.shape
    if not pair_ordered:
        x = pair_order(x).flatten(-2)
    slots = gather_slots(x, src)  # (B, H, V, D), laid out (B, V, H, D) or (B, H, V, D)
    V = slots.shape[2]
    if slots.is_contiguous():  # a cache's rows: rotate in the (B, H, V, D) layout
        return rotate(slots.view(B, H, V, D // 2, 2), cos[:, None], sin[:, None]).view(B, H, V, D)
    pairs = slots.transpose(1, 2).view(B, V, H, D // 2, 2)
    return rotate(pairs, cos[:, :, None], sin[:, :, None]).view(B, V, H, D).transpose(1, 2)


def rotate_plain(x: Tensor, factor: Any) -> Tensor:
    """RoPE'd plain tokens, one slot each: x (B, H, n, D) in pair order, factor (B, 1, n, D/2)."""
    B, H, n, D = x.shape
    return apply_rotation(x.reshape(B, H, n, D // 2, 2), factor).view(B, H, n, D)


def average_copies(out: Tensor, src: Tensor, valid: Tensor, n_rows: int, backend: str = "native") -> Tensor:
    """Mean of the virtual slots of each compact row: (B, H, V, D) -> (B, n_rows, H, D), the
    layout HF's attention output takes. src: (B, V) target row of each slot; valid: (B, V)
    False for padding slots, which are sent to a dropped extra row. backend "torch_scatter"
    uses torch_scatter.scatter_mean (optional dependency)."""
    B, H, V, D = out.shape
    index = torch.where(valid.reshape(-1), _flat_index(src, n_rows), B * n_rows)
    rows = out.transpose(1, 2).reshape(B * V, H * D)
    if backend == "torch_scatter":
        from torch_scatter import scatter_mean
        mean = scatter_mean(rows, index, dim=0, dim_size=B * n_rows + 1)
    else:
        summed = rows.new_zeros((B * n_rows + 1, H * D)).index_add_(0, index, rows)
        counts = torch.bincount(index, minlength=B * n_rows + 1).clamp_min(1)
        mean = summed / counts.to(rows.dtype)[:, None]
    return mean[:-1].view(B, n_rows, H, D)


def exact_scores(q: Tensor, k: Tensor, q_src: Tensor, k_src: Tensor, cos_q: Tensor, sin_q: Tensor,
                 cos_k: Tensor, sin_k: Tensor) -> Tensor:
    """Paper Eq. 10: RoPE scores of the virtual sequence from *unique* q / k products.

    q: (B, H, Pq, D), k: (B, H, Pk, D) un-rotated; *_src: (B, Vq) / (B, Vk) slot -> row;
    cos/sin: (B, V, D) per slot. With pairs (x1, x2) = halves of D and angle difference
    a = theta_m - theta_n per frequency, score = sum_d (q1 k1 + q2 k2) cos a + (q1 k2 - q2 k1) sin a.
    Materialises (B, H, Vq, Vk, D/2): a reference kernel, not a fast one. Returns (B, H, Vq, Vk).
    """
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    dot = q1[:, :, :, None] * k1[:, :, None] + q2[:, :, :, None] * k2[:, :, None]  # (B, H, Pq, Pk, D/2)
    cross = q1[:, :, :, None] * k2[:, :, None] - q2[:, :, :, None] * k1[:, :, None]
    B, H, Pq, Pk, half = dot.shape
    rows = q_src[:, None, :, None, None].expand(B, H, -1, Pk, half)
    dot, cross = dot.gather(2, rows), cross.gather(2, rows)
    cols = k_src[:, None, None, :, None].expand(B, H, dot.shape[2], -1, half)
    dot, cross = dot.gather(3, cols), cross.gather(3, cols)
    cq, sq = cos_q[..., :half][:, None, :, None], sin_q[..., :half][:, None, :, None]  # (B, 1, Vq, 1, D/2)
    ck, sk = cos_k[..., :half][:, None, None], sin_k[..., :half][:, None, None]  # (B, 1, 1, Vk, D/2)
    return (dot * (cq * ck + sq * sk) + cross * (sq * ck - cq * sk)).sum(-1)


def _allowed(layout: VirtualLayout, q_pos: Tensor, q_valid: Tensor, window: Optional[int] = None) -> Tensor:
    """(B, 1, Vq, V) bool: a query slot sees valid key slots at positions <= its own (and, with a
    sliding window, > its own - window: HF's rule, on virtual positions). Padding query slots see
    everything (their outputs are dropped) so no softmax row is empty."""
    behind = q_pos[:, None, :, None] - layout.pos[:, None, None, :]
    allowed = layout.valid[:, None, None, :] & (behind >= 0)
    if window is not None:
        allowed &= behind < window
    return allowed | ~q_valid[:, None, :, None]


def _sdpa(state: VTUState, q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool = False,
          allowed: Optional[Tensor] = None) -> Tensor:
    """SDPA over the virtual slots, on a path that keeps a fused kernel (route counted):

    * "causal" / "no_mask": no mask tensor (``allowed`` None; causal or not), GQA native
      (``enable_gqa``);
    * "mask_repeat_kv" / "mask": the boolean mask ``allowed`` (B, 1, Vq, V); with GQA, K / V are
      repeated per query head first, because SDPA given both a mask and ``enable_gqa`` falls
      back to the math kernel, which materialises (B, H, Vq, V)."""
    groups = q.shape[1] // k.shape[1]
    if allowed is None:
        state.routes["causal" if causal else "no_mask"] += 1
        gqa = {"enable_gqa": True} if groups > 1 else {}
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **gqa)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    state.routes["mask_repeat_kv" if groups > 1 else "mask"] += 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _grouped(a: Tensor, b: Tensor, groups: int, scale: float = 1.0) -> Tensor:
    """a (B, H, M, K) @ b (B, Hkv, K, N), times scale, with H = Hkv * groups (GQA), without
    repeating b: one batched product over the B * Hkv key / value heads."""
    B, H, M, K = a.shape
    Hkv, N = b.shape[1], b.shape[-1]
    a3, b3 = a.reshape(B * Hkv, groups * M, K), b.reshape(B * Hkv, K, N)
    if scale == 1.0:
        return torch.bmm(a3, b3).view(B, H, M, N)
    return torch.baddbmm(a3.new_empty(()), a3, b3, beta=0, alpha=scale).view(B, H, M, N)


def vtu_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                  scaling: Optional[float] = None, dropout: float = 0.0, sliding_window: Optional[int] = None,
                  **kwargs: Any) -> tuple[Tensor, None]:
    """The registered attention function. query: (B, H, q_len, D) for the newest compact
    tokens; value: (B, Hkv, kv_len, D) for all cached compact tokens; key: the same compact
    tokens un-rotated (the model's own RoPE is the identity under VTU), or, with the decode-fast
    cache, (B, Hkv, V, D) already expanded to the virtual slots and rotated. sliding_window: the
    layer's window in virtual positions (e.g. Qwen2 sliding layers), None for full attention.
    Returns (B, q_len, H, D).

    Decode-fast cache: values stay compact; a step's attention probabilities over the virtual
    slots are summed into the compact rows they copy and multiplied with the compact values,
    sum_p softmax_p v_src(p) = sum_c (sum_{p in c} softmax_p) v_c, so no value is expanded."""
    state: VTUState = module.dymu_vtu
    pair_ordered, state.pair_ordered = state.pair_ordered, False  # set by the RoPE hook, for this call
    rotated, state.query_rotated = state.query_rotated, False  # likewise: the decode step's q is rotated
    if state.cache == "decode_fast" and not pair_ordered:
        state.without_rope_hook()
    fast = state.cache == "decode_fast"
    _, H, q_len, D = query.shape
    kv_len = value.shape[2]
    layout, n_query_slots, unpadded, plain = state.step(kv_len, q_len)
    scale = scaling if scaling is not None else D ** -0.5
    groups = H // value.shape[1]
    soft_dtype = torch.float32 if state.kernel == "eager" else torch.promote_types(query.dtype, torch.float32)
    if plain and q_len == 1 and sliding_window is None:  # a decode step
        if not fast:  # the compact cache's keys, expanded and rotated for this step
            key = state.step_keys(key, pair_ordered)
            query = query if pair_ordered else pair_order(query).flatten(-2)
        return _decode_step(state, query, key, value, scale, groups, soft_dtype, rotated), None

    layout = layout.to(query.device)  # a model split over devices (device_map) runs layers elsewhere
    q_src = layout.src[:, -n_query_slots:] - (kv_len - q_len)  # query slot -> row of `query`
    q_pos, q_valid = layout.pos[:, -n_query_slots:], layout.valid[:, -n_query_slots:]
    k_src = layout.src
    cos, sin = state.rope(query)
    cos_q, sin_q = cos[:, -n_query_slots:], sin[:, -n_query_slots:]
    repeat = (lambda t: t.repeat_interleave(groups, dim=1)) if groups > 1 else (lambda t: t)  # GQA, eager paths
    prefill = n_query_slots == layout.src.shape[1]
    plain_q = plain and pair_ordered  # decode steps: the queries are the new tokens themselves
    if state.kernel == "exact" and not fast:
        if pair_ordered:
            query, key = natural_order(query), natural_order(key)
        v = repeat(gather_slots(value, k_src))
        scores = exact_scores(query, repeat(key), q_src, k_src, cos_q, sin_q, cos, sin) * scale
    else:
        q = query if rotated else rotate_plain(query, state.plain_rotation(query)) if plain_q else \
            gather_rotated(query, q_src, cos_q, sin_q, pair_ordered)
        k = key if fast else gather_rotated(key, k_src, cos, sin, pair_ordered)
        if state.kernel == "sdpa" and (prefill or not fast):
            # no mask when nothing is padded and there is no window, and the queries are the whole
            # sequence (causal) or one new token; SDPA's is_causal aligns the diagonal top-left, so
            # several new tokens after cached ones take the mask
            single = n_query_slots == 1
            bare = sliding_window is None and unpadded and (prefill or single)
            allowed = None if bare else _allowed(layout, q_pos, q_valid, sliding_window)
            out = _sdpa(state, q, k, gather_slots(value, k_src), scale, prefill and not single, allowed)
            return _merge_copies(out, q_src, q_valid, q_len, state.backend, plain_q), None
        if fast:
            scores = _grouped(q, k.transpose(-1, -2), groups, scale)
        else:
            v = repeat(gather_slots(value, k_src))
            scores = q @ repeat(k).transpose(-1, -2) * scale
    if not (unpadded and sliding_window is None and n_query_slots == 1):  # one new token sees every slot
        scores = scores.masked_fill(~_allowed(layout, q_pos, q_valid, sliding_window), torch.finfo(scores.dtype).min)
    # "eager" follows HF's eager attention exactly (softmax in float32); "exact" (a math
    # reference) and "sdpa" (decode-fast steps, which SDPA cannot do) keep at least the input
    # precision, as SDPA does.
    probs = scores.softmax(dim=-1, dtype=soft_dtype).to(value.dtype)
    if fast:
        out = _onto_compact_values(state, probs, k_src[:, None, None, :].expand_as(probs), value, groups)
        return _merge_copies(out, q_src, q_valid, q_len, state.backend, plain_q), None
    return _merge_copies(probs @ v, q_src, q_valid, q_len, state.backend, plain_q), None


def _decode_step(state: VTUState, query: Tensor, key: Tensor, value: Tensor, scale: float, groups: int,
                 soft_dtype: torch.dtype, rotated: bool) -> Tensor:
    """One new plain token per row, with few operations: the query rotated by its slot's factor
    (unless the RoPE hook did), scaled scores against the rotated keys of every virtual slot,
    padding slots masked, probabilities summed into the compact rows, times the compact values
    (no value is expanded). When nothing is merged (``VTUTrack.identity``: a text-only prompt,
    an image no layer merged) and the kernel is "sdpa", one SDPA call over keys and values as
    they are (unless a padded batch meets GQA). query (B, H, 1, D) pair order; key
    (B, Hkv, V, D) rotated, pair order (the decode-fast cache's, or the compact cache's
    expanded for this step); value (B, Hkv, P, D). Returns (B, 1, H, D)."""
    track = state.track
    B, H = query.shape[:2]
    shared = track.per_forward
    if "slot_index" not in shared:  # once per forward, for every layer
        src = track.layout.src.to(query.device)
        shared["slot_index"] = src[:, None, None, :].expand(B, H, 1, src.shape[1])
        shared["padding"] = None if track.unpadded else ~track.layout.valid.to(query.device)[:, None, None, :]
    q = query if rotated else rotate_plain(query, state.plain_rotation(query))
    if track.identity and state.kernel == "sdpa" and (shared["padding"] is None or groups == 1):
        # slot v is compact row v: the cache is a plain one (a padded GQA batch would repeat K / V
        # for SDPA's fused kernel, more than the products below cost)
        allowed = None if shared["padding"] is None else ~shared["padding"]
        return _sdpa(state, q, key, value, scale, allowed=allowed).transpose(1, 2)
    scores = _grouped(q, key.transpose(-1, -2), groups, scale)  # (B, H, 1, V)
    if shared["padding"] is not None:
        scores = scores.masked_fill(shared["padding"], torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=soft_dtype).to(value.dtype)
    return _onto_compact_values(state, probs, shared["slot_index"], value, groups).transpose(1, 2)


def _onto_compact_values(state: VTUState, probs: Tensor, slot_index: Tensor, value: Tensor, groups: int) -> Tensor:
    """probs (B, H, n, V) over the virtual slots, summed into the compact rows the slots copy
    (slot_index: (B, H, n, V) compact row of each slot), times the compact values (B, Hkv, P, D):
    (B, H, n, D). No value is expanded (route "slot_probabilities")."""
    state.routes["slot_probabilities"] += 1
    compact = probs.new_zeros((*probs.shape[:3], value.shape[2])).scatter_add_(-1, slot_index, probs)
    return _grouped(compact, value, groups)


def _merge_copies(out: Tensor, q_src: Tensor, q_valid: Tensor, q_len: int, backend: str, plain: bool) -> Tensor:
    """(B, H, slots, D) -> (B, q_len, H, D): copies averaged, or, for plain tokens (one slot each,
    in order), the slots themselves."""
    return out.transpose(1, 2) if plain else average_copies(out, q_src, q_valid, q_len, backend)


def _identity_rotary(original: Callable[..., tuple[Tensor, Tensor]], state: "VTUState") -> Callable[..., tuple[Tensor, Tensor]]:
    """A rotary forward returning cos = 1, sin = 0 in the original's shape and dtype; cos
    carries the VTU state, for the modeling module's hooked apply_rotary_pos_emb (_rope_hook).
    It runs once per decoder forward, which is where the forward's new tokens meet the track.
    The newest pair is kept and handed out again while the call's shapes stay the same (every
    decode step after the first): the real rotary runs in ``VTUState.rope``, on virtual slots."""
    newest: dict[Any, tuple[Tensor, Tensor]] = {}

    def forward(x: Tensor, position_ids: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        state.begin_forward(position_ids.shape[-1])
        key = (tuple(position_ids.shape), x.dtype, x.device)
        if key not in newest:
            cos, sin = original(x, position_ids, *args, **kwargs)
            cos = torch.ones_like(cos)
            cos.dymu_vtu = state
            newest.clear()
            newest[key] = cos, torch.zeros_like(sin)
        return newest[key]
    return forward


def _rope_hook(apply: Callable[..., tuple[Tensor, Tensor]]) -> Callable[..., tuple[Tensor, Tensor]]:
    """apply_rotary_pos_emb that, for VTU's identity cos, hands q and k back in pair order (one
    copy each at compact length, which the cache then keeps) instead of multiplying them by 1,
    and tells the layer's attention call so; with the decode-fast cache, k comes back expanded
    to the new virtual slots and rotated there (what that cache keeps). In a decode step (one
    plain token per row; not for the "exact" kernel, which needs q un-rotated) q, and k for the
    decode-fast cache, are rotated here, each by one product with ``step_matrix``. Every other
    call is the original."""
    @functools.wraps(apply)
    def hooked(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        state = getattr(cos, "dymu_vtu", None)
        if state is None:
            return apply(q, k, cos, sin, *args, **kwargs)
        state.pair_ordered = state.hook_seen = True
        fast = state.cache == "decode_fast"
        if state.track.plain_tail and state.track.query_slots == 1 and state.kernel != "exact":  # decode steps
            m = state.step_matrix(q)  # one product each: rotated and in pair order
            state.query_rotated = True
            return rotate_by_matrix(q, m), (rotate_by_matrix(k, m) if fast else pair_order(k).flatten(-2))
        q, k = pair_order(q).flatten(-2), pair_order(k).flatten(-2)
        return q, (state.new_slot_keys(k) if fast else k)
    hooked.dymu_original = apply
    return hooked


_HOOKED: dict[str, weakref.WeakSet] = {}  # modeling module -> VTU-patched decoders built from it


def _use_rope_hook(module_name: str, decoder: nn.Module, on: bool) -> None:
    """Count decoder in (on) or out of its modeling module; the module's apply_rotary_pos_emb
    is hooked while a patched decoder of it is alive, and is the original again once none is."""
    module = sys.modules.get(module_name)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        return  # no module-level RoPE function: the identity RoPE then simply runs
    patched = _HOOKED.setdefault(module_name, weakref.WeakSet())
    (patched.add if on else patched.discard)(decoder)
    original = getattr(apply, "dymu_original", apply)
    module.apply_rotary_pos_emb = _rope_hook(original) if patched else original


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding ``rotary_emb`` and ``layers``) inside model."""
    for module in model.modules():
        if hasattr(module, "rotary_emb") and hasattr(module, "layers"):
            return module
    raise ValueError(f"{type(model).__name__} has no RoPE decoder (no module with rotary_emb and layers); "
                     "VTU needs a rotary-position LLM such as Llama or Qwen2")


def patch_llm(model: nn.Module, kernel: str = "sdpa", backend: str = "native", cache: str = "decode_fast") -> VTUState:
    """Put VTU into the RoPE decoder inside model (per instance, reversible with unpatch_llm).
    kernel: "sdpa" (default), "eager" (HF eager semantics) or "exact" (Eq. 10 reference);
    backend: how copies are averaged, "native" or "torch_scatter"; cache: what the KV cache
    keeps (see ``cache_bytes_formula``): "decode_fast" (default: keys expanded to the virtual
    slots and rotated once, compact values; decode steps about as fast as the unmerged model's) or
    "compact" (un-rotated compact keys and values, the least memory; each decode step expands
    and rotates the keys again). A model whose attention does not call its modeling module's
    apply_rotary_pos_emb gets "compact", with a warning, at its first forward."""
    from transformers import AttentionInterface

    decoder = find_decoder(model)
    existing = getattr(decoder, "dymu_vtu", None)
    if existing is not None:
        checked = VTUState(existing.rotary, kernel, backend, cache)  # validates the new settings
        existing.kernel, existing.backend, existing.cache = checked.kernel, checked.backend, checked.cache
        return existing
    attentions = [m for m in decoder.layers.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not attentions:
        raise ValueError(f"no attention layers with q_proj / k_proj found in {type(decoder).__name__}")
    AttentionInterface.register(ATTENTION_NAME, vtu_attention)
    rotary = decoder.rotary_emb
    state = VTUState(rotary.forward, kernel, backend, cache)
    config = attentions[0].config
    state.saved_attn_implementation = config._attn_implementation
    rotary.forward = _identity_rotary(state.rotary, state)
    state.modeling_module = type(attentions[0]).__module__
    _use_rope_hook(state.modeling_module, decoder, True)
    for attn in attentions:
        attn.dymu_vtu = state
    config._attn_implementation = ATTENTION_NAME
    state.saved_layer_types = None
    if any(getattr(a, "sliding_window", None) is not None for a in attentions):
        # Sliding layers still get their window (the attention kwarg, applied on virtual
        # positions), but their cache must keep every compact token: a compact window is not
        # a virtual one. Declaring the layers full makes HF build full-length cache layers.
        state.saved_layer_types = (getattr(config, "layer_types", None),)
        config.layer_types = ["full_attention"] * len(decoder.layers)
    decoder.dymu_vtu = state
    state.attentions = attentions
    return state


def unpatch_llm(model: nn.Module) -> None:
    """Undo patch_llm: the model's own RoPE and attention implementation again."""
    decoder = find_decoder(model)
    state: Optional[VTUState] = decoder.__dict__.pop("dymu_vtu", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no VTU patch")
    decoder.rotary_emb.__dict__.pop("forward", None)
    _use_rope_hook(state.modeling_module, decoder, False)
    for attn in state.attentions:
        attn.__dict__.pop("dymu_vtu", None)
    config = state.attentions[0].config
    config._attn_implementation = state.saved_attn_implementation
    if state.saved_layer_types is not None:
        config.layer_types = state.saved_layer_types[0]


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
