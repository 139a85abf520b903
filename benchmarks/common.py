"""What the benchmark scripts share: their common options and where their results go.

Results go to ``benchmarks/results/<bench>_<cpu|gpu>.json`` and a table between the
``<!-- <bench>:<cpu|gpu>:begin/end -->`` markers of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parser(doc: str | None, reps: int = 3, warmup: int = 1, dtype: bool = False) -> argparse.ArgumentParser:
    """A parser showing the script's docstring, with --device, --reps, --warmup (and --dtype)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions; medians are reported")
    p.add_argument("--warmup", type=int, default=warmup, help="repetitions run first and thrown away")
    return p


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repetitions of ``times[num] / times[den]``: each repetition runs the modes back
    to back, so a per-repetition ratio cancels the machine's slow drifts."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def device_kind(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


def write_readme_table(key: str, text: str) -> None:
    """Put ``text`` between the ``<!-- key:begin/end -->`` markers of benchmarks/README.md."""
    readme = HERE / "README.md"
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    content = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in content:
        content = content[: content.index(begin)] + block + content[content.index(end) + len(end):]
    else:
        content = content.rstrip() + f"\n\n{block}\n"
    readme.write_text(content)


def publish(bench: str, device: str, results: dict[str, Any], table: str) -> Path:
    """Write ``results`` to results/<bench>_<cpu|gpu>.json, ``table`` into the README, and print it."""
    kind = device_kind(device)
    out = HERE / "results" / f"{bench}_{kind}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    write_readme_table(f"{bench}:{kind}", table)
    print(table)
    return out
