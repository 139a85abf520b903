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
  token counts (target >= 0.9 of the bound), split like the VLM benchmark: a FLOP-equivalent
  pass runs the unpatched blocks on the same per-layer token counts with no DToMe work at all
  (attention on the layer's tokens, the MLP on the next count), so ``DToMe / FLOP-equivalent``
  is DToMe's own overhead and ``FLOP-equivalent / bound`` what this hardware makes of fewer
  tokens (matrix products over fewer rows run at a lower rate per row);
* the same at batch 1 for ViT-L-14-336 with the reference's published 72out thresholds
  (dymu-spec section 3.3) on the astronaut photo;
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
from common import DTYPES, device_kind, paired, parser, publish, write_readme_table  # noqa: E402,F401 (vlm.py imports it here)

TARGETS = {"ViT-B-16": "50out", "ViT-L-14-336": "72out"}
MODES = ("unpatched", "off", "fixed_r", "threshold", "flop_equivalent")


def benchmark_images() -> list:
    """16 images of mixed complexity: the bundled photos plus synthetic shape images."""
    images = list(sample_photos().values())
    images += [shapes_image(n, seed=n) for n in (0, 2, 6, 12, 24, 48, 96)]
    return images[:16]


def set_mode(model: torch.nn.Module, mode: str, thresholds: dymu_viz.Thresholds) -> None:
    patched = getattr(model.visual, "dymu", None) is not None
    if mode in ("unpatched", "flop_equivalent"):
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


def flop_equivalent(visual: torch.nn.Module, pixels: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The unpatched open_clip blocks on one image with DToMe's per-layer token counts and none of
    its work: block i attends over counts[i] tokens and its MLP runs on counts[i + 1]."""
    x = visual._embeds(pixels)
    for i, blk in enumerate(visual.transformer.resblocks):
        x = x[:, :counts[i]]
        x = x + blk.ls_1(blk.attention(blk.ln_1(x)))
        x = x[:, :counts[i + 1]]
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return visual.ln_post(x[:, 0]) @ visual.proj


@torch.no_grad()
def time_modes(model, batches: list[torch.Tensor], thresholds, reps: int, warmup: int, device: str,
               counts: list[list[int]] | None = None) -> dict:
    """Seconds per pass over all ``batches``, per mode and repetition, modes interleaved;
    counts: per batch of one image, its per-layer counts (for the FLOP-equivalent mode)."""
    modes = MODES if counts is not None else MODES[:-1]
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(warmup + reps):
        for mode in modes:
            set_mode(model, mode, thresholds)
            sync(device)
            start = time.perf_counter()
            for b, batch in enumerate(batches):
                if mode == "flop_equivalent":
                    flop_equivalent(model.visual, batch, counts[b])
                else:
                    model.encode_image(batch)
            sync(device)
            if rep >= warmup:
                times[mode].append(time.perf_counter() - start)
    return times


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
        t = time_modes(model, batches, thresholds, reps, warmup, device, chosen_counts.tolist() if bs == 1 else None)
        row = timing_row(name, bs, n, device, dtype, t, flop_ratio(chosen_counts, width, hidden), chosen_counts)
        if bs > 1:
            row["padding_flop_share"] = padded_flop_overhead(chosen_counts, width, hidden)
            row["gap_to_padding_free_bound"] = row["flop_bound"] / row["threshold_speedup"] - 1.0
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": name, "target": TARGETS[name], "measured": time.strftime("%Y-%m-%d"), "reps": reps,
            "thresholds": thresholds.values, "rows": rows}


def kept_results(device: str, rerun: set[tuple[str, str]]) -> list[dict]:
    """Results of the (model, target) pairs not run this time, kept from the last published run
    (each says when it was measured in its ``measured`` field)."""
    path = Path(__file__).resolve().parent / "results" / f"encoder_{device_kind(device)}.json"
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text())["results"] if (r["model"], r["target"]) not in rerun]


def timing_row(name: str, bs: int, n: int, device: str, dtype: torch.dtype, t: dict, bound: float,
               counts: torch.Tensor) -> dict:
    speedup = paired(t, "unpatched", "threshold")
    row = {
        "model": name, "batch": bs, "images": n, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "images_per_s": {m: n / statistics.median(v) for m, v in t.items()},
        "off_over_unpatched_time": paired(t, "off", "unpatched"),
        "off_over_unpatched_per_rep": [a / b for a, b in zip(t["off"], t["unpatched"])],
        "fixed_r_speedup": paired(t, "unpatched", "fixed_r"),
        "threshold_speedup": speedup, "flop_bound": bound, "threshold_speedup_over_bound": speedup / bound,
        "mean_output_tokens": float(counts[:, -1].float().mean()),
    }
    if "flop_equivalent" in t:
        row["flop_equivalent_speedup_over_bound"] = paired(t, "unpatched", "flop_equivalent") / bound
        row["threshold_over_flop_equivalent_time"] = paired(t, "threshold", "flop_equivalent")
    return row


@torch.no_grad()
def published_row(device: str, dtype: torch.dtype, reps: int, warmup: int) -> dict:
    """ViT-L-14-336 at batch 1 with the reference's published 72out thresholds, astronaut photo."""
    name = "ViT-L-14-336"
    loaded = load_encoder(name, "random", device, dtype)
    model = loaded.model
    pixels = loaded.preprocess(sample_photos(["astronaut"])["astronaut"])[None].to(device, dtype)
    thresholds = dymu_viz.Thresholds.published(f"{name}-tome-72out")
    dymu_viz.patch(model, thresholds)
    counts = dymu_viz.encode(model, pixels).counts.cpu()
    blk = model.visual.transformer.resblocks[0]
    t = time_modes(model, [pixels], thresholds, reps, warmup, device, counts.tolist())
    row = timing_row(name, 1, 1, device, dtype, t, flop_ratio(counts, blk.mlp.c_fc.in_features,
                                                              blk.mlp.c_fc.out_features), counts)
    print(json.dumps(row), flush=True)
    return {"model": name, "target": "published 72out, astronaut", "measured": time.strftime("%Y-%m-%d"),
            "reps": reps, "thresholds": thresholds.values, "rows": [row]}


def table(results: list[dict]) -> str:
    lines = ["| model | batch | device/dtype | unpatched im/s | off / unpatched time | ToMe r speed-up "
             "| DToMe speed-up | FLOP bound | DToMe / bound | FLOP-equivalent / bound | DToMe / FLOP-equivalent time "
             "| padding FLOPs | gap to bound | mean tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            pad = f"{100 * r['padding_flop_share']:.1f} %" if "padding_flop_share" in r else "-"
            gap = f"{100 * r['gap_to_padding_free_bound']:.1f} %" if "gap_to_padding_free_bound" in r else "-"
            fe = f"{r['flop_equivalent_speedup_over_bound']:.2f}" if "flop_equivalent_speedup_over_bound" in r else "-"
            own = f"{r['threshold_over_flop_equivalent_time']:.2f}" if "threshold_over_flop_equivalent_time" in r else "-"
            lines.append(
                f"| {r['model']} ({res['target']}) | {r['batch']} | {r['device']}/{r['dtype']} "
                f"| {r['images_per_s']['unpatched']:.2f} | {r['off_over_unpatched_time']:.3f} "
                f"| {r['fixed_r_speedup']:.2f}x | {r['threshold_speedup']:.2f}x | {r['flop_bound']:.2f}x "
                f"| {r['threshold_speedup_over_bound']:.2f} | {fe} | {own} | {pad} | {gap} | {r['mean_output_tokens']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, dtype=True)
    p.add_argument("--models", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--published", action="store_true",
                   help="also ViT-L-14-336 at batch 1 with the reference's published 72out thresholds (astronaut)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = [run_model(m, args.device, DTYPES[args.dtype], args.reps, args.warmup, args.batch_sizes)
               for m in args.models]
    if args.published:
        results.append(published_row(args.device, DTYPES[args.dtype], args.reps, args.warmup))
    results += kept_results(args.device, {(r["model"], r["target"]) for r in results})
    device_name = torch.cuda.get_device_name() if device_kind(args.device) == "gpu" else platform.processor() or "cpu"
    publish("encoder", args.device, {"device": device_name, "threads": torch.get_num_threads(),
                                     "torch": torch.__version__, "reps": args.reps, "warmup": args.warmup,
                                     "results": results}, table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
