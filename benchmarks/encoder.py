"""Encoder throughput: unpatched vs patched with merging off, fixed r (ToMe) and thresholds (DToMe).

    python benchmarks/encoder.py                      # CPU, ViT-B-16 and ViT-L-14-336
    python benchmarks/encoder.py --device cuda --dtype bfloat16

Models are randomly initialised (exact architectures); thresholds are calibrated on the
benchmark images themselves for a "Kout" target, and fixed r uses the same per-layer r.
Modes are timed interleaved, repetition by repetition, so machine noise hits them alike; the
first ``--warmup`` repetitions are thrown away, and every ratio is the median of the
per-repetition (paired) ratios. Every figure of interest is a ratio within one run:

* off / unpatched time (target <= 1.03);
* threshold speed-up at batch 1 against the FLOP bound computed from the measured per-layer
  token counts (target >= 0.9 of the bound);
* padding at batch 16 of mixed images: the FLOP share spent on padding, and the gap between
  the measured speed-up and the padding-free FLOP bound (target <= 10 %).

Results go to benchmarks/results/encoder_<device>.json and into the table in benchmarks/README.md.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dymu_viz
from dymu_viz.calibrate import find_thresholds
from dymu_viz.data import sample_photos, shapes_image
from dymu_viz.models import load_encoder
from dymu_viz.stats import flop_ratio, padded_flop_overhead

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, device_kind, parser, publish, write_readme_table  # noqa: E402,F401 (vlm.py imports it here)

TARGETS = {"ViT-B-16": "50out", "ViT-L-14-336": "72out"}
MODES = ("unpatched", "off", "fixed_r", "threshold")


def benchmark_images() -> list:
    """16 images of mixed complexity: the bundled photos plus synthetic shape images."""
    images = list(sample_photos().values())
    images += [shapes_image(n, seed=n) for n in (0, 2, 6, 12, 24, 48, 96)]
    return images[:16]


def set_mode(model: torch.nn.Module, mode: str, thresholds: dymu_viz.Thresholds) -> None:
    patched = getattr(model.visual, "dymu", None) is not None
    if mode == "unpatched":
        if patched:
            dymu_viz.unpatch(model)
    elif mode == "off":
        dymu_viz.patch(model)  # patched, merging off
    elif mode == "fixed_r":
        dymu_viz.patch(model, r=list(thresholds.r))
    else:
        dymu_viz.patch(model, thresholds)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_modes(model, batches: list[torch.Tensor], thresholds, reps: int, warmup: int, device: str) -> dict:
    """Seconds per pass over all ``batches``, per mode and repetition, modes interleaved."""
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(warmup + reps):
        for mode in MODES:
            set_mode(model, mode, thresholds)
            sync(device)
            start = time.perf_counter()
            for batch in batches:
                model.encode_image(batch)
            sync(device)
            if rep >= warmup:
                times[mode].append(time.perf_counter() - start)
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over repetitions of time[num] / time[den]."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


@torch.no_grad()
def run_model(name: str, device: str, dtype: torch.dtype, reps: int, warmup: int, batch_sizes: list[int]) -> dict:
    loaded = load_encoder(name, "random", device, dtype)
    model = loaded.model
    pixels = torch.stack([loaded.preprocess(im) for im in benchmark_images()]).to(device, dtype)
    thresholds = find_thresholds(model, [pixels], target=TARGETS[name], name=name)
    dymu_viz.patch(model, thresholds)
    counts = dymu_viz.encode(model, pixels).counts.cpu()  # (16, L+1), identical alone or batched
    blk = model.visual.transformer.resblocks[0]
    width, hidden = blk.mlp.c_fc.in_features, blk.mlp.c_fc.out_features
    rows = []
    for bs in batch_sizes:
        n = 4 if bs == 1 else bs  # batch 1: four images of different complexity
        chosen = pixels[:n] if bs > 1 else pixels[[0, 3, 4, 9]]
        chosen_counts = counts[:n] if bs > 1 else counts[[0, 3, 4, 9]]
        batches = list(torch.split(chosen, bs))
        t = time_modes(model, batches, thresholds, reps, warmup, device)
        bound = flop_ratio(chosen_counts, width, hidden)
        speedup = paired(t, "unpatched", "threshold")
        row = {
            "model": name, "batch": bs, "images": n, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "images_per_s": {m: n / statistics.median(t[m]) for m in MODES},
            "off_over_unpatched_time": paired(t, "off", "unpatched"),
            "off_over_unpatched_per_rep": [a / b for a, b in zip(t["off"], t["unpatched"])],
            "fixed_r_speedup": paired(t, "unpatched", "fixed_r"),
            "threshold_speedup": speedup,
            "flop_bound": bound,
            "threshold_speedup_over_bound": speedup / bound,
            "mean_output_tokens": float(chosen_counts[:, -1].float().mean()),
        }
        if bs > 1:
            row["padding_flop_share"] = padded_flop_overhead(chosen_counts, width, hidden)
            row["gap_to_padding_free_bound"] = bound / speedup - 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": name, "target": TARGETS[name], "measured": time.strftime("%Y-%m-%d"), "reps": reps,
            "thresholds": thresholds.values, "rows": rows}


def kept_results(device: str, rerun: set[str]) -> list[dict]:
    """Results of the models not run this time, kept from the last published run (each row
    says when it was measured through its own ``run`` field)."""
    path = Path(__file__).resolve().parent / "results" / f"encoder_{device_kind(device)}.json"
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text())["results"] if r["model"] not in rerun]


def table(results: list[dict]) -> str:
    lines = ["| model | batch | device/dtype | unpatched im/s | off / unpatched time | ToMe r speed-up "
             "| DToMe speed-up | FLOP bound | DToMe / bound | padding FLOPs | gap to bound | mean tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            pad = f"{100 * r['padding_flop_share']:.1f} %" if "padding_flop_share" in r else "-"
            gap = f"{100 * r['gap_to_padding_free_bound']:.1f} %" if "gap_to_padding_free_bound" in r else "-"
            lines.append(
                f"| {r['model']} ({res['target']}) | {r['batch']} | {r['device']}/{r['dtype']} "
                f"| {r['images_per_s']['unpatched']:.2f} | {r['off_over_unpatched_time']:.3f} "
                f"| {r['fixed_r_speedup']:.2f}x | {r['threshold_speedup']:.2f}x | {r['flop_bound']:.2f}x "
                f"| {r['threshold_speedup_over_bound']:.2f} | {pad} | {gap} | {r['mean_output_tokens']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, dtype=True)
    p.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = [run_model(m, args.device, DTYPES[args.dtype], args.reps, args.warmup, args.batch_sizes)
               for m in args.models]
    results += kept_results(args.device, {r["model"] for r in results})
    device_name = torch.cuda.get_device_name() if device_kind(args.device) == "gpu" else platform.processor() or "cpu"
    publish("encoder", args.device, {"device": device_name, "threads": torch.get_num_threads(),
                                     "torch": torch.__version__, "reps": args.reps, "warmup": args.warmup,
                                     "results": results}, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
