"""DyMU in lmms-eval: models, token accounting in the logged samples, and an offline task.

Installing dymu_viz with the ``eval`` extra registers an lmms-eval model per VLM family through the
entry-point group lmms-eval 0.7 reads (``lmms_eval.models``):

* ``dymu_llava``: HF LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf`` or a local folder);
* ``dymu_llava_onevision``: HF LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-7b-ov-hf`` ...);
* ``dymu_qwen2_5_vl``: HF Qwen2-VL / Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct`` ...);
* ``dymu_qwen3_vl``: HF Qwen3-VL, dense or MoE (``Qwen/Qwen3-VL-8B-Instruct`` ...);
* ``dymu_internvl``: HF InternVL3 (``OpenGVLab/InternVL3-8B-hf`` ...).

    python -m lmms_eval eval --model dymu_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,thresholds=low,mode=vtu \\
        --tasks gqa --batch_size 8 --log_samples --output_path logs/

Every generated sample's ``token_counts`` carries DyMU's accounting under ``"dymu"`` (tower tokens
per crop, compact / virtual LLM length, KV-cache entries, the batch's stage times and CUDA peak
memory, FLOPs), and the
run's results JSON gets the summary (mean, std, min, median, max) under ``"throughput"``.
``TASKS_DIR`` holds ``dymu_photos``, an offline task over the bundled photos (``--include_path``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

# Per-sample numbers the summary describes (keys of a logged sample's token_counts[0]["dymu"]).
SUMMARY_KEYS = ("image_tokens", "llm_compact_length", "llm_virtual_length", "kv_cache_entries")
STATISTICS = ("mean", "std", "min", "median", "max")
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 1605632  # lmms-eval's Qwen models' picture bounds (model arguments)


class HarnessProcessor:
    """``processor`` as a ``dymu_*`` lmms-eval model calls it: each prompt's pictures prepared as
    lmms-eval's own model of the family prepares them (``VLMFamily.lmms_pictures``), with its
    processor options (``VLMFamily.lmms_processor_options`` from ``min_pixels`` / ``max_pixels``,
    as in ``--model_args``); everything else is the processor's own. Measure budgets with it
    (``vlm.baselines.match_budget(model, HarnessProcessor(model, processor), ...)``) to see each
    picture at the size an lmms-eval run gives it: Qwen's grids follow the picture size."""

    def __init__(self, model: Any, processor: Any, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
        from ..vlm.family import family_of

        self.model, self.processor, self.family = model, processor, family_of(model)
        self.options = self.family.lmms_processor_options(int(min_pixels), int(max_pixels))

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if images is not None:  # nested per prompt (as dymu_viz passes them), one flat list, or one image
            images = images if isinstance(images, (list, tuple)) else [images]
            nested = all(isinstance(per, (list, tuple)) for per in images)
            images = [self.family.lmms_pictures(self.model, list(per)) for per in images] if nested \
                else self.family.lmms_pictures(self.model, list(images))
        return self.processor(images=images, text=text, **{**self.options, **kwargs})

    def __getattr__(self, name: str) -> Any:
        if name == "processor":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.processor, name)


def models() -> dict[str, str]:
    """lmms-eval model name -> its class in ``harness``: one per VLM family with an lmms_name."""
    from ..vlm.family import FAMILIES
    from ..vlm import families  # noqa: F401  (registers every family)

    return {f.lmms_name: f.lmms_class for f in FAMILIES.values() if f.lmms_name}


def manifests() -> list:
    """The ``lmms_eval.models`` entry point: the models this package adds to lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(name, simple_class_path=f"dymu_viz.eval.harness.{class_name}")
            for name, class_name in models().items()]


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


def load_samples(path: Union[str, Path], task: Optional[str] = None) -> list[dict[str, Any]]:
    """The logged samples of one task of an lmms-eval run (a ``*_samples_<task>.jsonl`` file, or a
    folder searched for ``task``'s, or for its only one), each with ``dymu`` = its DyMU record
    (None when the model reported none)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob(f"*_samples_{task or '*'}.jsonl"))
        if len(files) != 1:
            found = ", ".join(f.name for f in sorted(path.rglob("*_samples_*.jsonl"))) or "none"
            raise ValueError(f"{path} holds {len(files)} logged-sample files" + (f" of task {task}" if task else "")
                             + f"; name the task (task=...) or a file. Found: {found}")
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
    """The DyMU summary a run's results JSON carries (lmms-eval prefixes throughput keys "avg_"),
    refused unless it covers every sample of the run (responses that ``--use_cache`` served from
    an earlier run were not generated again and carry no DyMU record)."""
    throughput = results.get("throughput", {})
    summary = {key: {stat: throughput.get(f"avg_dymu_{key}_{stat}") for stat in STATISTICS} for key in SUMMARY_KEYS}
    missing = [key for key, stats in summary.items() if None in stats.values()]
    if missing:
        raise ValueError(f"the results carry no DyMU summary for {', '.join(missing)}: was the model dymu_*, and "
                         "were the answers generated in this run (not served by --use_cache)?")
    covered = throughput.get("avg_dymu_samples")
    logged = sum(n.get("effective", 0) for n in results.get("n-samples", {}).values())
    if covered is None or covered < logged:
        raise ValueError(f"the DyMU summary covers {covered or 0} of the run's {logged} samples: answers served by "
                         "--use_cache, and loglikelihood tasks, carry no DyMU record (run again without the cache)")
    return summary


def run_cli(model: str, model_args: str, output_path: Union[str, Path], tasks: str = "dymu_photos",
            batch_size: int = 2, device: Optional[str] = None, extra: Sequence[str] = (),
            overwrite: bool = False, processes: int = 1) -> Path:
    """Run ``python -m lmms_eval eval`` (logged samples on, ``TASKS_DIR`` included) into a new
    ``output_path`` (an existing non-empty one is an error unless ``overwrite``: then it is
    emptied first) and return it; a failed run (a non-zero exit, or no results written) raises
    with the end of its output. processes > 1:
    data parallel through ``accelerate launch --num_processes`` (one GPU each; on ``device="cpu"``
    CPU processes)."""
    output_path = Path(output_path)
    if output_path.exists() and any(output_path.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output_path} already holds a run; pass overwrite=True to replace it")
        shutil.rmtree(output_path)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              *(["--cpu"] if device == "cpu" else []), "-m"] if processes > 1 else [sys.executable, "-m"]
    command = [*launch, "lmms_eval", "eval", "--model", model, "--model_args", model_args,
               "--tasks", tasks, "--include_path", str(TASKS_DIR), "--batch_size", str(batch_size),
               "--output_path", str(output_path), "--log_samples",
               *(["--device", device] if device and processes == 1 else []), *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"lmms-eval exited with {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    if not any(output_path.rglob("*_results.json")):  # lmms-eval logs some failures and still exits 0
        raise RuntimeError(f"lmms-eval wrote no results:\n{(done.stdout + done.stderr)[-4000:]}")
    return Path(output_path)


def baseline_arg(baseline: Any) -> str:
    """The ``--model_args`` entry of a ``vlm.baselines`` ToMe / Pool / RandomPrune (e.g. from
    ``match_budget``)."""
    from ..vlm.baselines import Pool, RandomPrune, ToMe

    if isinstance(baseline, ToMe):
        return "tome=" + "/".join(str(r) for r in baseline.r)
    if isinstance(baseline, Pool):
        return f"pool={baseline.rows}x{baseline.cols}"
    if isinstance(baseline, RandomPrune):
        return f"random={baseline.keep}" + (f",seed={baseline.seed}" if baseline.seed else "")
    raise TypeError(f"expected a ToMe, Pool or RandomPrune baseline, got {type(baseline).__name__}")


def task_docs(task: str = "dymu_photos") -> list[dict[str, Any]]:
    """The questions of one of ``TASKS_DIR``'s tasks."""
    path = TASKS_DIR / task / f"{task}.jsonl"
    if not path.is_file():
        raise ValueError(f"no task {task!r} in {TASKS_DIR}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_seconds(record: dict[str, Any]) -> float:
    """A sample's share of its batch's vision + prefill + decode time."""
    return sum(record[f"batch_{stage}_s"] for stage in ("vision", "prefill", "decode")) / record["batch_size"]


def task_metric(results: dict[str, Any], task: str, metric: str) -> float:
    """A task's aggregated metric from a run's results JSON (as lmms-eval reports it: pope's F1
    and mme's scores are aggregated from per-sample dicts, not averaged)."""
    if task not in results.get("results", {}):
        raise ValueError(f"the results hold no task {task!r}; they hold {', '.join(results.get('results', {}))}")
    values = results["results"][task]
    if f"{metric},none" not in values:
        names = sorted(k.split(",")[0] for k in values if k.endswith(",none") and "_stderr" not in k)
        raise ValueError(f"task {task} reports no metric {metric!r}; it reports {', '.join(names)}")
    return float(values[f"{metric},none"])


def run_rows(runs: Mapping[str, Union[str, Path]], metric: str = "accuracy",
             task: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per labelled run folder, for one task (``task``; needed when a run has several):
    the task's aggregated metric (``task_metric``), mean ± std image tokens, seconds per sample
    (its share of the batch) and GFLOPs per sample (vision + LLM; left out when a family's
    record has no vision FLOPs)."""
    rows = []
    for label, folder in runs.items():
        samples = load_samples(folder, task)
        records = [s["dymu"] for s in samples]
        if None in records:
            raise ValueError(f"{folder}: some samples carry no DyMU record (a dymu_* model's generate_until run "
                             "logs one per sample; loglikelihood tasks and answers served by --use_cache log none)")
        name = task or next(iter(load_results(folder)["results"]))
        tokens = describe(r["image_tokens"] for r in records)
        row = {"setting": label, metric: task_metric(load_results(folder), name, metric),
               "image_tokens": tokens["mean"], "image_tokens_std": tokens["std"],
               "seconds": statistics.fmean(sample_seconds(r) for r in records), "samples": len(samples)}
        if all(r["vision_flops"] is not None for r in records):
            row["gflops"] = statistics.fmean(sum(r[f"{s}_flops"] for s in ("vision", "prefill", "decode"))
                                             for r in records) / 1e9
        rows.append(row)
    return rows


def rows_table(rows: Sequence[dict[str, Any]], metric: str = "accuracy", reference: str = "full") -> str:
    """Markdown of ``run_rows``; time against the ``reference`` row, flagged SLOWER when above it."""
    base = next((r["seconds"] for r in rows if r["setting"] == reference), None)
    lines = [f"| setting | {metric} | image tokens | s / sample | GFLOPs / sample | time vs {reference} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if base is None else f"{r['seconds'] / base:.2f}" + (" SLOWER" if r["seconds"] > base else "")
        gflops = f"{r['gflops']:.2f}" if "gflops" in r else "-"
        lines.append(f"| {r['setting']} | {r[metric]:.3f} | {r['image_tokens']:.1f} ± {r['image_tokens_std']:.1f} | "
                     f"{r['seconds']:.3f} | {gflops} | {ratio} |")
    return "\n".join(lines)
