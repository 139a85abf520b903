"""VTU's attention: the state one patched LLM shares across its layers (``VTUState``: kernel,
cache policy, RoPE of the virtual slots, the current generation's track) and the attention
function registered with transformers' attention interface (``vtu_attention``).

Every call gets what it needs from its module's ``dymu_vtu`` state and the track's record of
the current forward; nothing is carried on tensors or left set between calls. Importing this
module registers the attention function (so a pickled patched model runs after loading).
"""

from __future__ import annotations

import collections
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .kernels import (allowed_slots, exact_scores, gather_rotated, gather_slots, grouped, merge_copies,
                      onto_compact_values, sdpa)
from .layout import VirtualLayout, VTUTrack
from .rope import apply_rotation, pair_order, natural_order, rotate_by_matrix, rotate_plain, rotation, rotation_matrix

ATTENTION_NAME = "dymu_vtu"
KERNELS = ("sdpa", "eager", "exact")
BACKENDS = ("native", "torch_scatter")
CACHE_POLICIES = ("compact", "decode_fast")


class VTUState:
    """Shared by every attention layer of one patched LLM: the real rotary embedding, the kernel,
    the cache policy, and the track of the generation now running (set before each forward).
    ``routes`` counts the attention paths taken (see ``vtu_attention``), for inspection."""

    def __init__(self, rotary: Callable[..., tuple[Tensor, Tensor]], kernel: str = "sdpa", backend: str = "native",
                 cache: str = "decode_fast"):
        """rotary(x, position_ids) -> (cos, sin): the model's real rotary embedding."""
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
        self.hook_seen = False  # the model's attention has called the hooked apply_rotary_pos_emb
        self.identity: Optional[tuple[Any, Tensor, Tensor]] = None  # (shapes, cos = 1, sin = 0) handed out last
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

    def identity_rope(self, x: Tensor, position_ids: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """What the patched rotary embedding returns, once per decoder forward (where the forward's
        new tokens meet the track): cos = 1, sin = 0 in the real rotary's shape and dtype. The pair
        is kept and handed out again while the call's shapes stay the same (every decode step after
        the first); the real rotary runs in ``rope``, on virtual slots. The modeling module's
        hooked apply_rotary_pos_emb recognises this very cos tensor (``hand_over``)."""
        self.begin_forward(position_ids.shape[-1])
        key = (tuple(position_ids.shape), x.dtype, x.device)
        if self.identity is None or self.identity[0] != key:
            cos, sin = self.rotary(x, position_ids, *args, **kwargs)
            self.identity = (key, torch.ones_like(cos), torch.zeros_like(sin))
        return self.identity[1], self.identity[2]

    def rotates_in_hook(self) -> bool:
        """Whether the RoPE hook rotates this forward's q (and the decode-fast cache's k): in a
        decode step, one plain token per row, except with the "exact" kernel (it needs q un-rotated)."""
        track = self.track
        return track.plain_tail and track.query_slots == 1 and self.kernel != "exact"

    def hand_over(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """What the hooked apply_rotary_pos_emb returns for this state's identity cos: q and k in
        pair order (one copy each at compact length) instead of multiplied by 1; with the
        decode-fast cache, k expanded to the new virtual slots and rotated there (what that cache
        keeps). In a decode step (``rotates_in_hook``) q, and k for the decode-fast cache, are
        rotated here, each by one product with ``step_matrix``. The forward's record counts the
        call, so that the layer's attention call knows its q / k came this way."""
        self.hook_seen = True
        record = self.track.per_forward
        record["rope_calls"] = record.get("rope_calls", 0) + 1
        fast = self.cache == "decode_fast"
        if self.rotates_in_hook():
            m = self.step_matrix(q)  # one product each: rotated and in pair order
            return rotate_by_matrix(q, m), (rotate_by_matrix(k, m) if fast else pair_order(k).flatten(-2))
        q, k = pair_order(q).flatten(-2), pair_order(k).flatten(-2)
        return q, (self.new_slot_keys(k) if fast else k)

    def arrived_through_hook(self) -> bool:
        """Called once per attention call: whether this layer's q / k came through ``hand_over``
        (the forward's record holds one RoPE hook call per attention call so far)."""
        record = self.track.per_forward
        record["attention_calls"] = record.get("attention_calls", 0) + 1
        return record.get("rope_calls", 0) == record["attention_calls"]

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
    if state.track is None:
        raise RuntimeError("VTU has no layout: run the model through a DyMU-patched VLM or call "
                           "state.start(layout, n_compact) before the forward")
    pair_ordered = state.arrived_through_hook()
    rotated = pair_ordered and state.rotates_in_hook()  # the decode step's q is rotated already
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
            allowed = None if bare else allowed_slots(layout, q_pos, q_valid, sliding_window)
            out = sdpa(state.routes, q, k, gather_slots(value, k_src), scale, prefill and not single, allowed)
            return merge_copies(out, q_src, q_valid, q_len, state.backend, plain_q), None
        if fast:
            scores = grouped(q, k.transpose(-1, -2), groups, scale)
        else:
            v = repeat(gather_slots(value, k_src))
            scores = q @ repeat(k).transpose(-1, -2) * scale
    if not (unpadded and sliding_window is None and n_query_slots == 1):  # one new token sees every slot
        scores = scores.masked_fill(~allowed_slots(layout, q_pos, q_valid, sliding_window), torch.finfo(scores.dtype).min)
    # "eager" follows HF's eager attention exactly (softmax in float32); "exact" (a math
    # reference) and "sdpa" (decode-fast steps, which SDPA cannot do) keep at least the input
    # precision, as SDPA does.
    probs = scores.softmax(dim=-1, dtype=soft_dtype).to(value.dtype)
    if fast:
        out = onto_compact_values(state.routes, probs, k_src[:, None, None, :].expand_as(probs), value, groups)
        return merge_copies(out, q_src, q_valid, q_len, state.backend, plain_q), None
    return merge_copies(probs @ v, q_src, q_valid, q_len, state.backend, plain_q), None


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
        return sdpa(state.routes, q, key, value, scale, allowed=allowed).transpose(1, 2)
    scores = grouped(q, key.transpose(-1, -2), groups, scale)  # (B, H, 1, V)
    if shared["padding"] is not None:
        scores = scores.masked_fill(shared["padding"], torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1, dtype=soft_dtype).to(value.dtype)
    return onto_compact_values(state.routes, probs, shared["slot_index"], value, groups).transpose(1, 2)



def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION_NAME, vtu_attention)


_register()
