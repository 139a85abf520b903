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

The package, one job per module: ``layout`` (data), ``rope`` (RoPE algebra), ``kernels``
(gathers, copy averaging, masks, SDPA routes), ``attention`` (``VTUState``, the attention
function), ``hf`` (patching HF decoders), ``cache`` (KV-cache bytes).
"""

from .attention import ATTENTION_NAME, BACKENDS, CACHE_POLICIES, KERNELS, VTUState, vtu_attention
from .cache import cache_bytes, cache_bytes_formula
from .hf import find_decoder, hooked_decoders, original_rope, patch_llm, rope_hooked, unpatch_llm
from .kernels import allowed_slots, average_copies, exact_scores, gather_rotated, gather_slots
from .layout import VirtualLayout, VTUTrack, is_identity
from .rope import apply_rotation, natural_order, pair_order, rotate, rotate_by_matrix, rotate_plain, rotation, rotation_matrix

__all__ = ["ATTENTION_NAME", "BACKENDS", "CACHE_POLICIES", "KERNELS", "VTUState", "VTUTrack", "VirtualLayout",
           "allowed_slots", "apply_rotation", "average_copies", "cache_bytes", "cache_bytes_formula", "exact_scores",
           "find_decoder", "gather_rotated", "gather_slots", "hooked_decoders", "is_identity", "natural_order",
           "original_rope", "pair_order", "patch_llm", "rope_hooked", "rotate", "rotate_by_matrix", "rotate_plain",
           "rotation", "rotation_matrix", "unpatch_llm", "vtu_attention"]
