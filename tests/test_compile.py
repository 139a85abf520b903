"""``torch.compile`` on a patched encoder gives what eager mode gives.

Users compile their models (ToMe-style merging has been reported to break ``torch.compile``).
DToMe's token counts depend on the data, so dynamo breaks the graph where a block reads them and
recompiles for new lengths; what must hold is the result. For every encoder family, with
dynamo's own tracing (backend "eager": the traced graphs run the same kernels, so results are
bit-identical): the compiled patched model equals the eager patched model on two batches of
different lengths and records its ``dymu.last``; patching and unpatching a model that was
compiled before reach the compiled model. With the default backend (inductor: generated
kernels, other rounding) one family gives the eager result within float round-off and the same
token counts, the scores staying far from their thresholds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dymu_viz
from tiny_models import FACTORIES, FAMILIES, family_outputs, flatten_outputs, image_size, patch_size, \
    redundancy_images

TAU = 0.9


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


def outputs(family: str, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return flatten_outputs(family_outputs(family, model, x))


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def batches(model: nn.Module) -> list[torch.Tensor]:
    """Four images of very different redundancy, then two of them (other lengths per block)."""
    x = redundancy_images(image_size(model), patch_size(model))
    return [x, x[[3, 1]]]


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_patched_encoder_equals_eager(family: str) -> None:
    model = FACTORIES[family]()
    dymu_viz.patch(model, TAU)
    compiled = torch.compile(model, backend="eager")
    for x in batches(model):
        eager = outputs(family, model, x)
        counts = model.dymu.last.counts.clone()
        model.dymu.last = None
        assert_equal(outputs(family, compiled, x), eager)
        assert compiled.dymu.last is not None, "the compiled call recorded no EncoderResult"
        assert torch.equal(compiled.dymu.last.counts, counts)
        assert int(counts[:, -1].min()) < int(counts[:, 0].max()), "test premise: nothing merged"


@pytest.mark.parametrize("family", ["hf_siglip", "open_clip"])  # the class swap is the same for every family
def test_patch_and_unpatch_reach_a_model_compiled_before(family: str) -> None:
    model = FACTORIES[family]()
    x = redundancy_images(image_size(model), patch_size(model))
    dymu_viz.patch(model, TAU)
    merged = outputs(family, model, x)
    dymu_viz.unpatch(model)
    compiled = torch.compile(model, backend="eager")
    vanilla = outputs(family, compiled, x)
    dymu_viz.patch(model, TAU)
    assert_equal(outputs(family, compiled, x), merged)
    dymu_viz.unpatch(model)
    assert_equal(outputs(family, compiled, x), vanilla)


def test_inductor_gives_the_eager_result() -> None:
    family = "open_clip"
    model = FACTORIES[family]()
    dymu_viz.patch(model, TAU)
    x = redundancy_images(image_size(model), patch_size(model))
    eager = outputs(family, model, x)
    result = model.dymu.last
    assert float(result.margins.min()) > 1e-4, "test premise: an edge score sits at its threshold"
    compiled = torch.compile(model)
    out = outputs(family, compiled, x)
    assert torch.equal(compiled.dymu.last.counts, result.counts)
    assert torch.equal(compiled.dymu.last.groups, result.groups)
    for k in eager:
        torch.testing.assert_close(out[k], eager[k], rtol=1e-4, atol=1e-5)
