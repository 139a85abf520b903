"""Patching by class swap (ToMe / tomesd style): a patched encoder is still a normal module.

For every encoder family: ``copy.deepcopy`` and pickle / ``torch.save`` round trips keep it
patched, with its own state and block callables that point at the copy's own layers; forward
hooks and pre-hooks fire while patched and survive ``unpatch``; accelerate's device hooks work
whether they were added before or after patching; ``unpatch`` restores the object exactly (same
class, same ``__dict__`` keys, hooks intact); assigning a ``Thresholds`` takes its schedule."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import dymu_viz
from dymu_viz import Thresholds
from tiny_models import FACTORIES, FAMILIES, family_outputs, flatten_outputs, image_size, redundancy_images


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def setup(family: str) -> tuple[nn.Module, torch.Tensor, list[float]]:
    model = FACTORIES[family]()
    size = image_size(model)
    patch = size // 4
    x = redundancy_images(size, patch)
    depth = len(dymu_viz.patch(model).dymu.adapter.blocks)
    dymu_viz.unpatch(model)
    return model, x, [0.5] * depth


def outputs(family: str, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return flatten_outputs(family_outputs(family, model, x))


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def perturb(module: nn.Module) -> None:
    """Change every weight a little (tells a copy's layers from the original's)."""
    for p in module.parameters():
        p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_is_patched_independently(family: str) -> None:
    model, x, taus = setup(family)
    dymu_viz.patch(model, taus)
    reference = outputs(family, model, x)
    assert (model.dymu.last.n_tokens < model.dymu.last.counts[:, 0]).any(), "the thresholds must merge"

    twin = copy.deepcopy(model)
    assert type(twin) is type(model) and twin.dymu is not model.dymu and twin.dymu.module is twin
    assert twin.dymu.thresholds == taus and twin.dymu.last is not None
    assert_same_outputs(outputs(family, twin, x), reference)
    # the copy's block callables run the copy's layers, not the original's
    perturb(twin)
    assert not torch.equal(next(iter(outputs(family, twin, x).values())), next(iter(reference.values())))
    assert_same_outputs(outputs(family, model, x), reference)
    twin.dymu.thresholds = float("inf")
    assert model.dymu.thresholds == taus
    dymu_viz.unpatch(twin)
    assert type(twin) is type(model)._dymu_base and hasattr(model, "dymu")


class LowRankDelta(nn.Module):
    """What LoRA (PEFT) does to a linear layer: wrap it and add a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def wrap_mlp_linears(model: nn.Module) -> int:
    """Wrap every linear layer of the blocks' MLPs in a LowRankDelta, in place; how many."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and ".mlp." in f".{name}"]
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LowRankDelta(module))
    return len(targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_wrapped_after_patching_are_the_ones_that_run(family: str) -> None:
    """LoRA / PEFT-style wrappers added to a patched model take effect (merging off: exactly the
    unpatched wrapped model; merging: the wrapped layers run), and a block removed after
    patching is named, not run."""
    model, x, taus = setup(family)
    dymu_viz.patch(model, taus)
    merged_before = outputs(family, model, x)
    model.dymu.thresholds = None
    off_before = outputs(family, model, x)
    torch.manual_seed(0)
    assert wrap_mlp_linears(model) >= 2 * len(taus)  # the blocks (and a MAP head's MLP)
    off = outputs(family, model, x)
    assert not torch.equal(next(iter(off.values())), next(iter(off_before.values()))), "the wrappers must change the output"
    model.dymu.thresholds = taus
    merged = outputs(family, model, x)
    assert not torch.equal(next(iter(merged.values())), next(iter(merged_before.values())))
    dymu_viz.unpatch(model)
    vanilla = outputs(family, model, x)
    for k in vanilla:
        torch.testing.assert_close(off[k], vanilla[k], rtol=1e-5, atol=1e-6)
    dymu_viz.patch(model, taus)
    layers = next(m for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == len(taus))
    del layers[-1]
    with pytest.raises(ValueError, match=f"{len(taus)} thresholds given but the .* encoder has {len(taus) - 1} layers"):
        outputs(family, model, x)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_round_trip_keeps_the_patch(family: str, how: str) -> None:
    model, x, taus = setup(family)
    base = type(model)
    dymu_viz.patch(model, Thresholds(taus, [1] * (len(taus) - 1) + [0]))
    reference = outputs(family, model, x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__name__ == f"DyMU{base.__name__}" and isinstance(loaded, base)
    assert loaded.dymu.module is loaded and loaded.dymu.r == model.dymu.r
    assert_same_outputs(outputs(family, loaded, x), reference)
    dymu_viz.unpatch(loaded)
    assert type(loaded) is base and not hasattr(loaded, "dymu")


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_fire_while_patched_and_unpatch_restores_the_object(family: str) -> None:
    model, x, taus = setup(family)
    base = type(model)
    seen: list[str] = []
    pre = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append("pre"), with_kwargs=True)
    model.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    before = outputs(family, model, x)
    keys_before = set(model.__dict__)  # after a first call (HF adds its own bookkeeping then)
    n_calls = len(seen)
    assert n_calls > 0

    dymu_viz.patch(model, taus)
    model.dymu.last = None
    outputs(family, model, x)
    last = model.dymu.last
    assert last is not None and (last.n_tokens < last.counts[:, 0]).any()  # DyMU ran and merged in the hooked call
    assert seen[n_calls:] == ["pre", f"DyMU{base.__name__}"] * (n_calls // 2)
    late = model.register_forward_hook(lambda m, args, out: seen.append("late"))  # added while patched

    dymu_viz.unpatch(model)
    assert type(model) is base and set(model.__dict__) == keys_before
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 2
    mark = len(seen)
    assert_same_outputs(outputs(family, model, x), before)
    assert "late" in seen[mark:] and base.__name__ in seen[mark:]
    pre.remove()
    late.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("order", ["hook-then-patch", "patch-then-hook"])
def test_accelerate_device_hooks_keep_working(family: str, order: str) -> None:
    from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model, x, taus = setup(family)
    base = type(model)
    before = outputs(family, model, x)
    hook = SequentialHook(AlignDevicesHook(execution_device="cpu", io_same_device=True), Count())
    if order == "hook-then-patch":
        add_hook_to_module(model, hook)
        dymu_viz.patch(model, taus)
    else:
        dymu_viz.patch(model, taus)
        add_hook_to_module(model, hook)
    model.dymu.last = None
    outputs(family, model, x)
    assert model.dymu.last is not None and Count.calls > 0  # both DyMU and the hook ran
    calls = Count.calls
    dymu_viz.unpatch(model)
    assert type(model) is base
    assert_same_outputs(outputs(family, model, x), before)
    assert Count.calls > calls  # the hook is still there, around the original forward
    remove_hook_from_module(model)
    assert_same_outputs(outputs(family, model, x), before)


def test_thresholds_assignment_takes_the_schedule() -> None:
    model, x, taus = setup("hf_clip")
    dymu_viz.patch(model, thresholds=taus)
    assert model.dymu.r is None
    schedule = [2, 2, 0, 0]
    model.dymu.thresholds = Thresholds([0.1] * 4, schedule)
    assert model.dymu.r == schedule and model.dymu.thresholds == [0.1] * 4
    model(pixel_values=x)
    counts = model.dymu.last.counts
    assert torch.equal(counts[:, 3], counts[:, 2]) and torch.equal(counts[:, 4], counts[:, 3])
    assert (counts[:, 2] < counts[:, 0]).all()
    model.dymu.thresholds = [0.2] * 4  # plain values keep the layers allowed now
    assert model.dymu.r == schedule
