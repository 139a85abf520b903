"""Shared fixtures for the dymu_viz tests; the model factories live in ``tiny_models.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import FACTORIES  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every notebook cell checks stored outputs (token counts among them): mark them exact_counts,
    the set CI runs a second time under other CPU kernels."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.exact_counts)


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """make_model(family, **overrides) -> a fresh, eval-mode, randomly initialised encoder."""
    def make(family: str, **kwargs: Any) -> nn.Module:
        return FACTORIES[family](**kwargs)
    return make


@pytest.fixture
def no_grad():
    """Run the test under torch.no_grad() (inference-only model calls)."""
    with torch.no_grad():
        yield


from hypothesis import settings  # noqa: E402

# Property tests (test_properties.py): the same examples on every run and machine, no example
# database written, no per-example deadline (a busy 2-core machine is slow); pytest's
# --hypothesis-profile still chooses another profile.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.load_profile("ci")
