"""VTU's glue to HF transformers decoders, per instance and reversible: ``patch_llm`` swaps the
decoder's rotary embedding for one that returns the identity (cos = 1, sin = 0), hooks its
modeling module's ``apply_rotary_pos_emb`` (while a patched decoder of it is alive), and routes
its attention layers to ``vtu_attention``; ``unpatch_llm`` undoes all of it.

The hook recognises a VTU forward by the identity cos tensor its decoder's rotary just handed
out (the rotary marks its state as the active one of this thread's context, by weak reference):
every other call, another model's included, is the original function. Everything a patched
decoder needs lives on its modules (the rotary's, the decoder's and every attention layer's
``dymu_vtu``: one shared ``VTUState``), so ``copy.deepcopy``, pickle and ``torch.save`` keep it
working, and a second patched model in the same process has its own state.
"""

from __future__ import annotations

import contextvars
import functools
import sys
import weakref
from typing import Any, Callable, Optional

from torch import Tensor, nn

from .. import classswap
from .attention import ATTENTION_NAME, VTUState

# the VTU state whose rotary ran last in this context (a weak reference): the hook's way to it
_ACTIVE: contextvars.ContextVar[Optional[weakref.ref]] = contextvars.ContextVar("dymu_vtu_active", default=None)
_HOOKED: dict[str, weakref.WeakSet] = {}  # modeling module -> VTU-patched decoders built from it


class RealRotary:
    """The decoder's own rotary embedding, callable as (x, position_ids) -> (cos, sin) while its
    class is swapped for the identity (a picklable stand-in for the original bound forward)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: Tensor, position_ids: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return classswap.base_class(self.module).forward(self.module, x, position_ids, *args, **kwargs)


def _identity_rotary_forward(self: nn.Module, x: Tensor, position_ids: Tensor, *args: Any,
                             **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The forward of a VTU-patched rotary embedding: ``VTUState.identity_rope``."""
    state: VTUState = self.__dict__["dymu_vtu"]
    _use_rope_hook(state.modeling_module, state.decoder, True)  # a copy or an unpickled model registers itself
    _ACTIVE.set(weakref.ref(state))
    return state.identity_rope(x, position_ids, *args, **kwargs)


classswap.register("vtu_rotary", _identity_rotary_forward)


class RopeHook:
    """A modeling module's ``apply_rotary_pos_emb`` while VTU-patched decoders of it are alive:
    for the identity cos of the active VTU state, that state's ``hand_over`` (q / k in pair
    order, decode steps rotated); every other call, the original (``dymu_original``)."""

    def __init__(self, original: Callable[..., tuple[Tensor, Tensor]]):
        self.dymu_original = original
        functools.update_wrapper(self, original)

    def __call__(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        ref = _ACTIVE.get()
        state = ref() if ref is not None else None
        if state is None or state.identity is None or cos is not state.identity[1]:
            return self.dymu_original(q, k, cos, sin, *args, **kwargs)
        return state.hand_over(q, k)



def _use_rope_hook(module_name: str, decoder: nn.Module, on: bool) -> None:
    """Count decoder in (on) or out of its modeling module; the module's apply_rotary_pos_emb
    is hooked while a patched decoder of it is alive, and is the original again once none is."""
    module = sys.modules.get(module_name)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        return  # no module-level RoPE function: the identity RoPE then simply runs
    patched = _HOOKED.setdefault(module_name, weakref.WeakSet())
    if on and decoder in patched:
        return  # the common case, once per forward: nothing to do
    (patched.add if on else patched.discard)(decoder)
    if isinstance(apply, nn.Module):
        # transformers 5.25 with the kernels package: the function is a small module object, and
        # layers holding one unpickle by rebuilding it as type(module.apply_rotary_pos_emb)(). The
        # object stays; its forward is hooked in place.
        if patched:
            apply.forward = RopeHook(original_rope(module_name))
        else:
            apply.__dict__.pop("forward", None)
        return
    original = getattr(apply, "dymu_original", apply)
    module.apply_rotary_pos_emb = RopeHook(original) if patched else original


def original_rope(module_name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """A modeling module's ``apply_rotary_pos_emb`` without the hook: the function, or the
    forward of kernels' function object."""
    apply = sys.modules[module_name].apply_rotary_pos_emb
    function = apply.forward if isinstance(apply, nn.Module) else apply
    return getattr(function, "dymu_original", function)


def rope_hooked(module_name: str) -> bool:
    """Whether the module's ``apply_rotary_pos_emb`` goes through a RopeHook now."""
    apply = sys.modules[module_name].apply_rotary_pos_emb
    return isinstance(apply.forward if isinstance(apply, nn.Module) else apply, RopeHook)


def hooked_decoders(module_name: str) -> int:
    """How many VTU-patched decoders of the modeling module ``module_name`` are alive (its
    apply_rotary_pos_emb is hooked while there are any)."""
    return len(_HOOKED.get(module_name, ()))


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module holding ``rotary_emb`` and ``layers``) inside model."""
    for module in model.modules():
        if hasattr(module, "rotary_emb") and hasattr(module, "layers"):
            return module
    raise ValueError(f"{type(model).__name__} has no RoPE decoder (no module with rotary_emb and layers); "
                     "VTU needs a rotary-position decoder LLM")


def patch_llm(model: nn.Module, kernel: str = "sdpa", backend: str = "native", cache: str = "decode_fast") -> VTUState:
    """Put VTU into the RoPE decoder inside model (per instance, reversible with unpatch_llm).
    kernel: "sdpa" (default), "eager" (HF eager semantics) or "exact" (Eq. 10 reference);
    backend: how copies are averaged, "native" or "torch_scatter"; cache: what the KV cache
    keeps (see ``cache_bytes_formula``): "decode_fast" (default: keys expanded to the virtual
    slots and rotated once, compact values; decode steps about as fast as the unmerged model's) or
    "compact" (un-rotated compact keys and values, the least memory; each decode step expands
    and rotates the keys again). A model whose attention does not call its modeling module's
    apply_rotary_pos_emb gets "compact", with a warning, at its first forward."""
    decoder = find_decoder(model)
    existing = getattr(decoder, "dymu_vtu", None)
    if existing is not None:
        checked = VTUState(existing.rotary, kernel, backend, cache)  # validates the new settings
        existing.kernel, existing.backend, existing.cache = checked.kernel, checked.backend, checked.cache
        return existing
    attentions = [m for m in decoder.layers.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not attentions:
        raise ValueError(f"no attention layers with q_proj / k_proj found in {type(decoder).__name__}")
    rotary = decoder.rotary_emb
    state = VTUState(RealRotary(rotary), kernel, backend, cache)
    config = attentions[0].config
    state.saved_attn_implementation = config._attn_implementation
    state.modeling_module = type(attentions[0]).__module__
    state.decoder = decoder
    rotary.dymu_vtu = state
    classswap.swap_in(rotary, "vtu_rotary")
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
    rotary = decoder.rotary_emb
    rotary.__dict__.pop("dymu_vtu", None)
    classswap.swap_out(rotary)
    _use_rope_hook(state.modeling_module, decoder, False)
    for attn in state.attentions:
        attn.__dict__.pop("dymu_vtu", None)
    config = state.attentions[0].config
    config._attn_implementation = state.saved_attn_implementation
    if state.saved_layer_types is not None:
        config.layer_types = state.saved_layer_types[0]
