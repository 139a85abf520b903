"""``patch`` / ``unpatch``: DToMe on a model instance, reversibly (tomesd style).

    model = dymu_viz.patch(model, thresholds)   # DToMe with per-layer thresholds
    model = dymu_viz.patch(model, r=16)         # ToMe with a fixed r
    model.dymu.thresholds = [...]               # change settings in place
    out = model(pixels)                         # same call, same return type as before
    model.dymu.last                             # EncoderResult of the last call
    dymu_viz.unpatch(model)                     # back to the original

Only the one encoder instance found in ``model`` is touched; classes are never modified.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

from .adapters import EncoderAdapter, find_encoder
from .encoder import EncoderResult, MergeConfig
from .schedule import RSpec, parse_r
from .thresholds import Thresholds

ThresholdSpec = Union[Thresholds, Sequence[float], float, None]


class DyMUState:
    """Settings and last result of a patched encoder, reachable as ``model.dymu``."""

    def __init__(self, module: nn.Module, adapter: EncoderAdapter):
        self.module = module
        self.adapter = adapter
        self.config = MergeConfig()
        self.last: Optional[EncoderResult] = None

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
        self.configure(thresholds=value, r=self.config.r if self.mode == "threshold" else None)

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
            values = [float(thresholds)] * layers if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
            config = MergeConfig("threshold", values, rs)
        config.check_depth(layers, self.adapter.family)
        self.config = config

    def run(self, pixels: Tensor, output_hidden_states: bool = False, config: Optional[MergeConfig] = None,
            blocks: Optional[int] = None, **embed_kwargs: Any) -> EncoderResult:
        """Run the merging encoder (its first ``blocks`` blocks only, if given); the result is
        kept as ``last``."""
        self.last = self.adapter.run(pixels, config or self.config, output_hidden_states, blocks, **embed_kwargs)
        return self.last


def get_state(model: nn.Module) -> Optional[DyMUState]:
    """The ``DyMUState`` of the encoder inside ``model``, or None when it is not patched."""
    module, _ = find_encoder(model)
    return getattr(module, "dymu", None)


def patch(model: nn.Module, thresholds: ThresholdSpec = None, r: Optional[RSpec] = None) -> nn.Module:
    """Make the vision encoder inside ``model`` merge tokens; returns the same model.

    thresholds: a ``Thresholds``, one float per layer, or one float for all layers (DToMe).
    r: ToMe's int, (r, inflection) or per-layer list: fixed-r mode, or with thresholds the
    layers allowed to merge. Patching a patched model only changes its settings.
    """
    module, adapter_cls = find_encoder(model)
    state = getattr(module, "dymu", None)
    if not isinstance(state, DyMUState):
        state = DyMUState(module, adapter_cls(module))
        state.configure(thresholds, r)  # validate before touching the module

        def forward(*args: Any, **kwargs: Any) -> Any:
            return state.adapter.forward(state, *args, **kwargs)

        module.forward = forward
        module.dymu = state
        if model is not module:
            model.dymu = state
        return model
    state.configure(thresholds, r)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: the encoder's own forward again. Returns the same model."""
    module, _ = find_encoder(model)
    if not isinstance(getattr(module, "dymu", None), DyMUState):
        raise ValueError(f"{type(model).__name__} is not patched by dymu_viz")
    for obj in {id(model): model, id(module): module}.values():
        obj.__dict__.pop("dymu", None)
    module.__dict__.pop("forward", None)
    return model


def encode(model: nn.Module, pixels: Tensor, output_hidden_states: bool = False, blocks: Optional[int] = None,
           **embed_kwargs: Any) -> EncoderResult:
    """Run a patched model's encoder and return the full ``EncoderResult``; blocks: stop after
    that many blocks (no pooled output then)."""
    state = get_state(model)
    if state is None:
        raise ValueError("call dymu_viz.patch(model, ...) before encode()")
    return state.run(pixels, output_hidden_states, blocks=blocks, **embed_kwargs)
