"""DyMU in lmms-eval: models, token accounting in the logged samples, and an offline task.

Installing dymu_viz with the ``eval`` extra registers two lmms-eval models through the entry-point
group lmms-eval 0.7 reads (``lmms_eval.models``):

* ``dymu_llava``: HF LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf`` or a local folder);
* ``dymu_llava_onevision``: HF LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-7b-ov-hf`` ...).

    python -m lmms_eval eval --model dymu_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,thresholds=low,mode=vtu \\
        --tasks gqa --batch_size 8 --log_samples --output_path logs/

Every logged sample's ``token_counts`` carries DyMU's accounting under ``"dymu"`` (tower tokens
per crop, compact / virtual LLM length, KV-cache entries, the batch's stage times, FLOPs), and the
run's results JSON gets the summary (mean, std, min, median, max) under ``"throughput"``.
``TASKS_DIR`` holds ``dymu_photos``, an offline task over the bundled photos (``--include_path``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Union

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# Per-sample numbers the summary describes (keys of a logged sample's token_counts[0]["dymu"]).
SUMMARY_KEYS = ("image_tokens", "llm_compact_length", "llm_virtual_length", "kv_cache_entries")
STATISTICS = ("mean", "std", "min", "median", "max")


def manifests() -> list:
    """The ``lmms_eval.models`` entry point: the models this package adds to lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest("dymu_llava", simple_class_path="dymu_viz.eval.harness.DyMULlava"),
            ModelManifest("dymu_llava_onevision", simple_class_path="dymu_viz.eval.harness.DyMULlavaOneVision")]


def describe(values: Iterable[float]) -> dict[str, float]:
    """mean, std (population), min, median, max of a non-empty series."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "median": statistics.median(values), "max": max(values)}


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``describe`` of every ``SUMMARY_KEYS`` field over per-sample DyMU records."""
    records = list(records)
    return {key: describe(r[key] for r in records) for key in SUMMARY_KEYS}


def flat_summary(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"dymu_<field>_<statistic>": value}: the summary as lmms-eval's throughput metrics."""
    return {f"dymu_{key}_{stat}": value for key, stats in summary.items() for stat, value in stats.items()}


def summary_table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| per sample | mean ± std | min | median | max |", "|---|---|---|---|---|"]
    lines += [f"| {key} | {s['mean']:.1f} ± {s['std']:.1f} | {s['min']:g} | {s['median']:g} | {s['max']:g} |"
              for key, s in summary.items()]
    return "\n".join(lines)


def load_samples(path: Union[str, Path]) -> list[dict[str, Any]]:
    """The logged samples of one lmms-eval run (a ``*_samples_<task>.jsonl`` file, or a folder
    searched for exactly one), each with ``dymu`` = its DyMU record (None when the model
    reported none)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*_samples_*.jsonl"))
        if len(files) != 1:
            raise ValueError(f"{path} holds {len(files)} logged-sample files; name one of them: "
                             + ", ".join(f.name for f in files))
        path = files[0]
    samples = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for sample in samples:
        counts = sample.get("token_counts") or [None]
        sample["dymu"] = (counts[0] or {}).get("dymu")
    return samples


def load_results(path: Union[str, Path]) -> dict[str, Any]:
    """The results JSON of one lmms-eval run (a file, or a folder searched for exactly one)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*_results.json"))
        if len(files) != 1:
            raise ValueError(f"{path} holds {len(files)} results files; name one of them")
        path = files[0]
    return json.loads(path.read_text())


def summary_of_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The DyMU summary a run's results JSON carries (lmms-eval prefixes throughput keys "avg_")."""
    throughput = results.get("throughput", {})
    summary = {key: {stat: throughput.get(f"avg_dymu_{key}_{stat}") for stat in STATISTICS} for key in SUMMARY_KEYS}
    missing = [key for key, stats in summary.items() if None in stats.values()]
    if missing:
        raise ValueError(f"the results carry no DyMU summary for {', '.join(missing)} (was the model dymu_*?)")
    return summary
