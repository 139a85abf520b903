"""torch.compile on a DToMe encoder: eager against compiled, unpatched and patched.

    python benchmarks/compile.py                      # CPU, ViT-B-16, batch 16
    python benchmarks/compile.py --device cuda --dtype bfloat16

ViT-B-16 with random weights and thresholds calibrated for 50out on the benchmark images (as
``encoder.py``). Four callables, each on its own copy of the model so that no patch is switched
between repetitions (a switch would make dynamo recompile): the unpatched and the patched model,
each eager and ``torch.compile``d (default backend). The warm-up repetitions include compiling
and the recompiles for new token counts. Figures are paired per-repetition ratios, medians.
Results go to benchmarks/results/compile_<device>.json and the table in benchmarks/README.md.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import dymu_viz
from dymu_viz.calibrate import find_thresholds
from dymu_viz.models import load_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, paired, parser, publish  # noqa: E402
from encoder import benchmark_images, sync  # noqa: E402


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, reps=5, warmup=2, dtype=True)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    loaded = load_encoder("ViT-B-16", "random", args.device, dtype)
    pixels = torch.stack([loaded.preprocess(im) for im in benchmark_images()]).to(args.device, dtype)
    pixels = pixels[:args.batch_size]
    thresholds = find_thresholds(loaded.model, [pixels], target="50out", name="ViT-B-16")
    unpatched = copy.deepcopy(loaded.model)
    dymu_viz.unpatch(unpatched)
    patched = dymu_viz.patch(copy.deepcopy(loaded.model), thresholds)
    calls: dict[str, Callable] = {
        "unpatched eager": unpatched.encode_image, "unpatched compiled": torch.compile(unpatched.encode_image),
        "DToMe eager": patched.encode_image, "DToMe compiled": torch.compile(patched.encode_image)}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(args.warmup + args.reps):
        for name, call in calls.items():
            sync(args.device)
            start = time.perf_counter()
            call(pixels)
            sync(args.device)
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - start)
    tokens = patched.dymu.last.n_tokens.float().mean().item()
    results = {"model": "ViT-B-16", "device": args.device, "dtype": args.dtype, "batch": len(pixels),
               "mean_tokens": tokens, "measured": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
               "median_s": {k: statistics.median(v) for k, v in times.items()},
               "compiled_over_eager": {"unpatched": paired(times, "unpatched compiled", "unpatched eager"),
                                       "DToMe": paired(times, "DToMe compiled", "DToMe eager")}}
    med, ratio = results["median_s"], results["compiled_over_eager"]
    table = "\n".join([
        f"ViT-B-16, random weights, 50out thresholds ({tokens:.1f} tokens per image), batch {len(pixels)}, "
        f"{args.device} {args.dtype}, torch {torch.__version__}, {results['measured']}; {args.reps} repetitions:", "",
        "| model | eager (ms) | compiled (ms) | compiled / eager (paired median) |", "|---|---|---|---|",
        *(f"| {m} | {1e3 * med[f'{m} eager']:.0f} | {1e3 * med[f'{m} compiled']:.0f} | {ratio[m]:.2f} |"
          for m in ("unpatched", "DToMe"))])
    publish("compile", args.device, results, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
