"""``patch`` / ``unpatch``: DToMe on a model instance, reversibly (tomesd style).

    model = dymu_viz.patch(model, thresholds)   # DToMe with per-layer thresholds
    model = dymu_viz.patch(model, r=16)         # ToMe with a fixed r
    model.dymu.thresholds = [...]               # change settings in place
    out = model(pixels)                         # same call, same return type as before
    model.dymu.last                             # EncoderResult of the last call
    dymu_viz.unpatch(model)                     # back to the original

Patching swaps the class of the one encoder instance found in ``model`` for a subclass
``DyMU<Class>`` whose ``forward`` runs the merging loop (ToMe / tomesd style); no class is ever
modified and ``unpatch`` puts the original class back. Because the state lives in the instance
and the subclass pickles as "the base class, patched", a patched model survives
``copy.deepcopy``, ``torch.save(model)`` / pickle, module hooks and accelerate's device hooks.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from . import classswap
from .adapters import EncoderAdapter, adapter_for, find_encoder
from .encoder import EncoderResult, MergeConfig
from .schedule import RSpec, parse_r
from .thresholds import Thresholds

ThresholdSpec = Union[Thresholds, Sequence[float], float, None]


class DyMUState:
    """Settings and last result of a patched encoder, reachable as ``model.dymu``."""

    def __init__(self, module: nn.Module, adapter: Optional[EncoderAdapter] = None):
        self.module = module
        self._adapter = adapter
        self.config = MergeConfig()
        self.last: Optional[EncoderResult] = None

    @property
    def adapter(self) -> EncoderAdapter:
        """The family adapter, built from the module on first use (after a copy or an unpickle
        it is rebuilt, so its block callables point at the copy's own layers)."""
        if self._adapter is None:
            self._adapter = adapter_for(self.module)(self.module)
        return self._adapter

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "config": self.config, "last": self.last}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _adapter=None)

    @property
    def depth(self) -> int:
        return self.adapter.depth

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def thresholds(self) -> Optional[list[float]]:
        return self.config.thresholds

    @thresholds.setter
    def thresholds(self, value: ThresholdSpec) -> None:
        """A ``Thresholds`` brings its own schedule; plain values keep the layers allowed now."""
        keep_r = self.mode == "threshold" and not isinstance(value, Thresholds)
        self.configure(thresholds=value, r=self.config.r if keep_r else None)

    @property
    def r(self) -> Optional[list[int]]:
        return self.config.r

    @r.setter
    def r(self, value: Optional[RSpec]) -> None:
        self.configure(thresholds=self.config.thresholds, r=value)

    def configure(self, thresholds: ThresholdSpec = None, r: Optional[RSpec] = None) -> None:
        """Threshold mode when thresholds are given (r_i = 0 layers never merge), fixed-r
        (ToMe) mode when only r is given, merging off when neither is."""
        layers = self.depth
        rs = parse_r(layers, r) if r is not None else None
        if isinstance(thresholds, Thresholds):
            thresholds.check_depth(layers)
            rs = list(thresholds.r) if rs is None else rs
            thresholds = thresholds.values
        if thresholds is None:
            config = MergeConfig("fixed_r" if rs is not None else "off", None, rs)
        else:
            config = MergeConfig("threshold", threshold_values(thresholds, layers), rs)
        config.check_depth(layers, self.adapter.family)
        self.config = config

    def run(self, pixels: Tensor, output_hidden_states: bool = False, config: Optional[MergeConfig] = None,
            blocks: Optional[int] = None, **embed_kwargs: Any) -> EncoderResult:
        """Run the merging encoder (its first ``blocks`` blocks only, if given); the result is
        kept as ``last``."""
        self.last = self.adapter.run(pixels, config or self.config, output_hidden_states, blocks, **embed_kwargs)
        return self.last


def threshold_values(thresholds: Any, layers: int) -> list[float]:
    """One float per layer from one number (Python, NumPy or a 0-d tensor) or a sequence of
    them (a list, an array, a 1-d tensor); anything else is refused by name."""
    if hasattr(thresholds, "tolist"):
        thresholds = thresholds.tolist()
    if isinstance(thresholds, numbers.Real) and not isinstance(thresholds, bool):
        return [float(thresholds)] * layers
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, Sequence) or \
            not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in thresholds):
        raise TypeError(f"thresholds must be a number, one number per layer or a Thresholds (Thresholds.load "
                        f"reads a file); got {thresholds!r}")
    return [float(t) for t in thresholds]


def get_state(model: nn.Module) -> Optional[DyMUState]:
    """The ``DyMUState`` of the encoder inside ``model``, or None when it is not patched."""
    module, _ = find_encoder(model)
    return getattr(module, "dymu", None)


def _patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: DyMUState = self.__dict__["dymu"]
    return state.adapter.forward(state, *args, **kwargs)


def _refuse_while_merging(self: nn.Module, name: str) -> None:
    """timm's other entries into the blocks (``forward_features``, ...) bypass DToMe: refused
    while it merges, rather than returning unmerged tokens a caller would take for merged."""
    state = self.__dict__.get("dymu")
    if isinstance(state, DyMUState) and state.mode != "off":
        raise ValueError(f"{name} runs the blocks without DToMe; on a patched model call the model itself "
                         f"(pooled output) or dymu_viz.encode(model, pixels) (merged tokens, sizes, padding mask), "
                         f"or dymu_viz.unpatch(model) first")


classswap.register("encoder", _patched_forward, guard=_refuse_while_merging,
                   guarded=("forward_features", "forward_intermediates", "get_intermediate_layers"))


def patch(model: nn.Module, thresholds: ThresholdSpec = None, r: Optional[RSpec] = None) -> nn.Module:
    """Make the vision encoder inside ``model`` merge tokens; returns the same model.

    thresholds: a ``Thresholds``, one float per layer, or one float for all layers (DToMe).
    r: ToMe's int, (r, inflection) or per-layer list: fixed-r mode, or with thresholds the
    layers allowed to merge. Patching a patched model only changes its settings.
    """
    module, adapter_cls = find_encoder(model)
    state = module.__dict__.get("dymu")
    if not isinstance(state, DyMUState):
        state = DyMUState(module, adapter_cls(module))
        state.configure(thresholds, r)  # validate before touching the module
        module.dymu = state
        classswap.swap_in(module, "encoder")
        if model is not module:
            model.dymu = state
        return model
    state.configure(thresholds, r)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the encoder's own class (and forward) again. Returns the same model."""
    module, _ = find_encoder(model)
    if not isinstance(module.__dict__.get("dymu"), DyMUState):
        raise ValueError(f"{type(model).__name__} is not patched by dymu_viz")
    for obj in {id(model): model, id(module): module}.values():
        obj.__dict__.pop("dymu", None)
    classswap.swap_out(module)
    return model


def encode(model: nn.Module, pixels: Tensor, output_hidden_states: bool = False, blocks: Optional[int] = None,
           **embed_kwargs: Any) -> EncoderResult:
    """Run a patched model's encoder and return the full ``EncoderResult``; blocks: stop after
    that many blocks (no pooled output then)."""
    state = get_state(model)
    if state is None:
        raise ValueError("call dymu_viz.patch(model, ...) before encode()")
    return state.run(pixels, output_hidden_states, blocks=blocks, **embed_kwargs)
