"""Per-layer merge schedules: how many tokens each layer removes (r_i).

Two families:

* DyMU's calibration schedules (spec section 3.1): ``constant``, ``linear`` and
  ``reverse_linear`` split an ``r_total`` over L layers. "Kout" presets use
  ``r_total = n_patches - K``.
* ToMe's ``r`` argument: an int, an ``(r, inflection)`` pair, or an explicit per-layer list.

In threshold mode the r_i only say which layers may merge (r_i > 0); the thresholds decide
how many tokens actually go.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Sequence, Union

RSpec = Union[int, tuple, Sequence[int]]
SCHEDULES = ("constant", "linear", "reverse_linear")


def constant(r_total: int, layers: int) -> list[int]:
    """r_total // L per layer; the remainder goes, one each, to the first layers."""
    base, extra = divmod(r_total, layers)
    return [base + (i < extra) for i in range(layers)]


def linear(r_total: int, layers: int) -> list[int]:
    """Front-loaded: start at floor(2 r_total / L), fall by r0 / L per layer, then the
    remainder as one entry, then zeros (the reference's rule, reproduced exactly)."""
    r0 = (2 * r_total) // layers
    step = r0 / layers
    out: list[int] = []
    k = 0
    while len(out) < layers - 1:
        nxt = math.floor(r0 - k * step)
        if sum(out) + nxt >= r_total or nxt <= 0:
            break
        out.append(nxt)
        k += 1
    out.append(r_total - sum(out))
    return out + [0] * (layers - len(out))


def reverse_linear(r_total: int, layers: int) -> list[int]:
    """The linear schedule reversed: zeros first, the most merging in the last layers."""
    return linear(r_total, layers)[::-1]


def make_schedule(r_total: int, layers: int, schedule: str = "constant") -> list[int]:
    """r_i per layer for a total of r_total merges over ``layers`` layers."""
    if layers <= 0:
        raise ValueError(f"a schedule needs at least one layer, got {layers}")
    if r_total < 0:
        raise ValueError(f"r_total must be >= 0, got {r_total}")
    name = schedule.replace("-", "_")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return {"constant": constant, "linear": linear, "reverse_linear": reverse_linear}[name](r_total, layers)


def parse_r(layers: int, r: RSpec) -> list[int]:
    """ToMe's r: an int (same r everywhere), (r, inflection) for a linear ramp whose mean is
    r (inflection -1 decreases, +1 increases), or an explicit list (zero-padded to L). NumPy and
    torch integers and arrays count as ints and lists."""
    if hasattr(r, "tolist"):  # np.int64, a 0-d tensor -> int; an array or a 1-d tensor -> list
        r = r.tolist()
    if isinstance(r, bool) or not isinstance(r, (int, tuple, list)):
        raise TypeError(f"r must be an int, (r, inflection) or a list of ints per layer; got {r!r}")
    if isinstance(r, list) and not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in r):
        raise TypeError(f"a per-layer r must hold ints; got {r!r}")
    if isinstance(r, tuple) and len(r) != 2:
        raise ValueError(f"a tuple r must be (r, inflection), got {r!r}; pass a list for per-layer values")
    if isinstance(r, list):
        values = [int(v) for v in r]
        if len(values) > layers:
            raise ValueError(f"r lists {len(values)} layers but the model has {layers}")
        return values + [0] * (layers - len(values))
    r_mean, inflection = (r, 0.0) if isinstance(r, int) else r
    low = int(r_mean * (1.0 - inflection))
    high = 2 * r_mean - low
    if layers == 1:
        return [low]
    step = (high - low) / (layers - 1)
    return [int(low + step * i) for i in range(layers)]


def kout_r_total(name: str, n_patches: int) -> int:
    """r_total for a "Kout" preset name such as "72out" or "192out" (K = output tokens)."""
    match = re.fullmatch(r"(\d+)out", name.strip())
    if not match:
        raise ValueError(f"{name!r} is not a Kout preset such as '72out' or '192out'")
    k = int(match.group(1))
    if not 0 < k <= n_patches:
        raise ValueError(f"{name!r} asks for {k} tokens but the encoder has {n_patches} patches")
    return n_patches - k


def token_counts(n_tokens: int, rs: Sequence[int], protected: int = 0) -> list[int]:
    """Token count after each fixed-r layer, with the per-layer cap floor((n - protected)/2).
    Returns L + 1 counts, the first being the input count."""
    counts = [n_tokens]
    for r in rs:
        n = counts[-1]
        counts.append(n - min(max(r, 0), (n - protected) // 2))
    return counts
