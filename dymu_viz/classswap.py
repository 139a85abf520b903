"""Reversible per-instance patching by class swap (ToMe / tomesd style).

``swap_in(module, kind)`` turns ``module`` into an instance of ``DyMU<Class>``, a subclass made
once per (class, kind) whose ``forward`` is the one registered for ``kind``; ``swap_out``
puts the original class back. No class is ever modified. The subclass pickles and deep-copies as
"an instance of the base class, swapped for ``kind``", so patched modules survive ``copy.deepcopy``
and ``torch.save(model)``; accelerate's device hooks, which keep the forward bound when they were
added, are pointed at the current class's forward on every swap.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

from torch import nn

_FORWARDS: dict[str, Callable[..., Any]] = {}
_ATTRIBUTES: dict[str, dict[str, Any]] = {}
_GUARDS: dict[str, tuple[Callable[[nn.Module, str], None], tuple[str, ...]]] = {}
_CLASSES: dict[tuple[type, str], type] = {}


def register(kind: str, forward: Callable[..., Any], guard: Callable[[nn.Module, str], None] | None = None,
             guarded: tuple[str, ...] = (), **attributes: Any) -> None:
    """Make ``forward(self, *args, **kwargs)`` the forward of every class swapped in for ``kind``
    (and ``attributes`` its other class attributes). Methods named in ``guarded`` that a base
    class has (other ways into the module than ``forward``) call ``guard(self, name)`` first,
    which may refuse; the others are left to the base class."""
    _FORWARDS[kind] = forward
    _ATTRIBUTES[kind] = attributes
    if guard is not None:
        _GUARDS[kind] = (guard, guarded)


def _guarded_method(base: type, name: str, guard: Callable[[nn.Module, str], None]) -> Callable[..., Any]:
    method = getattr(base, name)

    @functools.wraps(method)
    def checked(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        guard(self, name)
        return method(self, *args, **kwargs)
    return checked


def base_class(module: nn.Module) -> type:
    """The class ``module`` had before it was swapped (its own class when it is not swapped)."""
    return getattr(type(module), "_dymu_base", type(module))


def is_swapped(module: nn.Module, kind: str) -> bool:
    return getattr(type(module), "_dymu_kind", None) == kind


def swapped_class(base: type, kind: str) -> type:
    """``DyMU<Base>`` for ``kind``: ``base`` with the registered forward (HF reads a model's
    signature from ``forward``, so the base forward's signature is kept)."""
    if (base, kind) not in _CLASSES:
        forward = _FORWARDS[kind]

        @functools.wraps(base.forward)
        def swapped_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not is_swapped(self, kind):  # a stale bound method, kept by someone after swap_out
                return base_class(self).forward(self, *args, **kwargs)
            return forward(self, *args, **kwargs)

        guard, names = _GUARDS.get(kind, (None, ()))
        guarded = {name: _guarded_method(base, name, guard) for name in names if callable(getattr(base, name, None))}
        _CLASSES[base, kind] = type(f"DyMU{base.__name__}", (base,), {
            **_ATTRIBUTES[kind], **guarded, "forward": swapped_forward, "__reduce_ex__": _reduce, "_dymu_base": base, "_dymu_kind": kind,
            "__module__": __name__, "__doc__": f"{base.__name__} patched by dymu_viz ({kind})."})
    return _CLASSES[base, kind]


def _reduce(self: nn.Module, protocol: int) -> tuple:
    return _rebuild, (type(self)._dymu_base, type(self)._dymu_kind), self.__dict__


def _rebuild(base: type, kind: str) -> nn.Module:
    cls = swapped_class(base, kind)
    return cls.__new__(cls)


def _rebind_accelerate(module: nn.Module) -> None:
    """accelerate's hooks call the forward bound when the hook was added (``_old_forward``)."""
    if "_old_forward" in module.__dict__:
        module._old_forward = types.MethodType(type(module).forward, module)


def swap_in(module: nn.Module, kind: str) -> None:
    module.__class__ = swapped_class(type(module), kind)
    _rebind_accelerate(module)


def swap_out(module: nn.Module) -> None:
    module.__class__ = base_class(module)
    _rebind_accelerate(module)
