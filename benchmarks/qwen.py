"""Qwen2.5-VL prefill with DyMU rounds after the PatchMerger: counts, FLOP ratio, time ratio.
(``--tower`` and ``--tower-flops``: DToMe inside the ViT, see ``qwen_tower.py``.)

    python benchmarks/qwen.py                  # CPU: real-width ViT (2 of 32 blocks), LLM 4 x 1024, 672 px

Random weights (offline): Qwen2.5-VL-7B's classes, its ViT at the real width with
``--vision-layers`` blocks, and the LLM scaled to 4 layers x 1024 (16 heads of 64, GQA 8). The
rounds are calibrated on the nine bundled photos at each ``--keep`` share, then each photo of
``--images`` (resized to ``--side`` px) is prefilled alone (batch 1), interleaving:

* vanilla: the unpatched model;
* full: patched, no merging (the patch's own overhead);
* vtu / compact at each keep: merged units, with VTU, or without it (each merged token at its
  first unit's position).

Per mode: the whole forward (tower + rounds + LLM, what a user waits for at prefill) and the LLM
alone (timed by hooks on the language model), medians of per-repetition ratios to vanilla; and
the LLM's prefill FLOP ratio (projections and MLP on compact rows, attention on the virtual
length). The tower runs in full in every mode (DyMU on Qwen merges after it), so the whole
forward gains less than the LLM.

``--windows`` instead times the rounds alone on one very large image (the photo ``--images[0]``
resized to ``--large`` px, 16 384 units at 3584 px; each unit's metric and feature are its 28 x 28
x 3 pixels, so no tower runs), matching on the whole image against inside W x W blocks of units:
rounds time, the largest score matrix, and the tokens kept at the same thresholds (calibrated on
the whole image to the first ``--keep`` share).

``--metrics`` instead compares the rounds' similarity metrics (``vlm.qwen.METRICS``), each
calibrated to the first ``--keep`` share: per photo, the tokens kept, the relative error of the
unit features the LLM gets back (each unit's merged feature against its own vanilla feature,
Frobenius norm over the image), and the time of tower + rounds. With random weights this says
how well each metric groups *similar features*, not which answers better.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, publish  # noqa: E402

import dymu_viz  # noqa: E402
from dymu_viz import vlm  # noqa: E402
from dymu_viz.vlm.costs import llm_prefill_flops  # noqa: E402


def resized(image, side: int):
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)))


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, reps=5, warmup=1)
    p.add_argument("--vision-layers", type=int, help="ViT blocks (default 2; 4 with --tower)")
    p.add_argument("--text-layers", type=int, default=13, help="--tower: the LLM's layers (2048 wide)")
    p.add_argument("--side", type=int, help="longest side of each photo, px (default 672; 448 with --tower*)")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images", nargs="+", default=["chelsea", "rocket", "grace_hopper"])
    p.add_argument("--metrics", action="store_true", help="compare the rounds' similarity metrics instead")
    p.add_argument("--windows", type=int, nargs="*", help="time windowed matching with these block sides instead")
    p.add_argument("--large", type=int, default=3584, help="--windows: the large image's longest side, px")
    p.add_argument("--tower", action="store_true", help="merging inside the ViT: times at the 7B's tower : LLM "
                                                        "proportion (with --metrics: feature errors); qwen_tower.py")
    p.add_argument("--tower-flops", action="store_true", help="merging inside the ViT: prefill FLOPs at the real 7B "
                                                              "shapes from counts on the real-depth tower")
    args = p.parse_args(argv)
    tower_mode = args.tower or args.tower_flops
    args.side = args.side or (448 if tower_mode else 672)
    args.vision_layers = args.vision_layers or (4 if tower_mode else 2)
    torch.manual_seed(0)
    if tower_mode:
        import qwen_tower

        if args.tower_flops:
            return qwen_tower.real_shape_flops(args)
        return qwen_tower.feature_errors(args) if args.metrics else qwen_tower.timed(args)
    if args.windows is not None:
        return compare_windows(args)
    loaded = vlm.load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", "random", args.device, torch.float32,
                          vision_layers=args.vision_layers, text_layers=4, text_width=1024)
    model, processor = loaded.model, loaded.processor
    photos = {name: resized(image, args.side) for name, image in dymu_viz.sample_photos().items()}
    if args.metrics:
        return compare_metrics(model, processor, photos, args, loaded.weights)
    thresholds = {keep: vlm.qwen.calibrate_rounds(model, processor, list(photos.values()), keep, args.rounds,
                                                  progress=False) for keep in args.keep}
    modes = [("vanilla", None, None), ("full", "full", None)] + \
        [(f"{mode}@{keep}", mode, keep) for keep in args.keep for mode in ("vtu", "compact")]
    llm_time: list[float] = []
    language_model = model.model.language_model
    language_model.register_forward_pre_hook(lambda m, a, k: llm_time.append(-time.perf_counter()), with_kwargs=True)
    language_model.register_forward_hook(lambda m, a, k, o: llm_time.append(llm_time.pop() + time.perf_counter()),
                                         with_kwargs=True)
    cfg = model.config.get_text_config()
    rows = []
    for name in args.images:
        prompt = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "describe the image"}]}], add_generation_prompt=True)
        inputs = dict(processor(images=[photos[name]], text=[prompt], return_tensors="pt"))
        inputs = {k: v.to(args.device) for k, v in inputs.items()}
        times: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in modes}
        accounting: dict[str, dict] = {}
        for rep in range(args.warmup + args.reps):
            for label, mode, keep in modes:
                if mode is None:
                    if "dymu_vlm" in model.__dict__:
                        vlm.unpatch_vlm(model)
                else:
                    vlm.patch_vlm(model, thresholds.get(keep), mode=mode)
                start = time.perf_counter()
                with torch.no_grad():
                    model(**inputs, use_cache=False)
                total = time.perf_counter() - start
                if rep >= args.warmup:
                    times[label].append((total, llm_time[-1]))
                if mode is not None:
                    accounting[label] = model.dymu_vlm.last[0]
        row = {"image": name, "units": accounting["full"]["image_positions"]}
        for label, mode, keep in modes[1:]:
            acc = accounting[label]
            ratio = lambda i: statistics.median(t[i] / v[i] for t, v in zip(times[label], times["vanilla"]))  # noqa: E731
            attended = acc["llm_compact_length"] if mode == "compact" else acc["llm_virtual_length"]
            flops = llm_prefill_flops(cfg, acc["llm_compact_length"], attended)
            vanilla_length = accounting["full"]["llm_virtual_length"]
            row[label] = {"tokens": acc["image_tokens"], "forward": ratio(0), "llm": ratio(1),
                          "llm_flops": flops / llm_prefill_flops(cfg, vanilla_length, vanilla_length)}
        row["vanilla_seconds"] = {"forward": statistics.median(t[0] for t in times["vanilla"]),
                                  "llm": statistics.median(t[1] for t in times["vanilla"])}
        rows.append(row)
    labels = [label for label, _, _ in modes[1:]]
    lines = [f"Qwen2.5-VL-7B classes, random weights: ViT {args.vision_layers} of 32 blocks x 1280, LLM 4 x 1024; "
             f"photos at {args.side} px, batch 1, {args.reps} reps (medians of ratios to vanilla); rounds "
             f"{args.rounds}, thresholds calibrated on the 9 bundled photos per keep share", "",
             "| image | units | " + " | ".join(f"{label}: tokens, LLM FLOPs, LLM time, forward time" for label in labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for row in rows:
        cells = [f"{row[label]['tokens']}, {row[label]['llm_flops']:.2f}, {row[label]['llm']:.2f}, "
                 f"{row[label]['forward']:.2f}" for label in labels]
        lines.append(f"| {row['image']} | {row['units']} | " + " | ".join(cells) + " |")
    publish("qwen", args.device, {"rows": rows, "weights": loaded.weights, "args": vars(args)}, "\n".join(lines))
    return 0


def compare_metrics(model, processor, photos: dict, args, weights: str) -> int:
    keep = args.keep[0]
    rows = []
    for metric in vlm.qwen.METRICS:
        thresholds = vlm.qwen.calibrate_rounds(model, processor, list(photos.values()), keep, args.rounds,
                                               progress=False, metric=metric)
        for name in args.images:
            pixels = processor.image_processor(images=[photos[name]], return_tensors="pt")
            pv, grid = pixels["pixel_values"].to(args.device), pixels["image_grid_thw"].to(args.device)
            with torch.no_grad():
                (vanilla,) = model.model.get_image_features(pv, grid).pooler_output
                times = []
                for rep in range(args.warmup + args.reps):
                    start = time.perf_counter()
                    (tokens,) = vlm.qwen.qwen_images(model, pv, grid, thresholds.values, metric=metric)
                    times.append(time.perf_counter() - start)
            error = float((tokens.features[tokens.mapping] - vanilla).norm() / vanilla.norm())
            rows.append({"metric": metric, "image": name, "units": len(vanilla), "tokens": len(tokens.features),
                         "feature_error": error, "seconds": statistics.median(times[args.warmup:])})
    lines = [f"Rounds' similarity metrics, each calibrated to keep {keep} ({args.rounds} rounds) on the 9 bundled photos "
             f"at {args.side} px; Qwen2.5-VL-7B classes, random weights, ViT {args.vision_layers} of 32 blocks; "
             f"medians of {args.reps} reps", "",
             "| metric | image | units | tokens | feature error | tower + rounds, s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['image']} | {r['units']} | {r['tokens']} | {r['feature_error']:.3f} | "
              f"{r['seconds']:.2f} |" for r in rows]
    publish("qwen_metric", args.device, {"rows": rows, "weights": weights, "args": vars(args)}, "\n".join(lines))
    return 0


def compare_windows(args) -> int:
    from dymu_viz.vlm.qwen import calibration_rounds, padded_units, split_pieces, unit_rounds

    image = resized(dymu_viz.sample_photos()[args.images[0]], args.large)
    h, w = image.height // 28, image.width // 28
    pixels = torch.from_numpy(np.asarray(image.crop((0, 0, 28 * w, 28 * h)))).float() / 255  # (28 h, 28 w, 3)
    units = pixels.view(h, 28, w, 28, 3).permute(0, 2, 1, 3, 4).reshape(h * w, -1).to(args.device)  # (U, 2352)
    units = units - units.mean(0)  # centred, so cosine similarity compares content, not brightness
    fraction = 1 - args.keep[0] ** (1 / args.rounds)
    thresholds, _ = calibration_rounds(*padded_units([(units, units)]), fraction, args.rounds)
    rows = []
    for window in [None, *args.windows]:
        pieces, _ = split_pieces([(units, units)], [1], [(h, w)], window)  # the rows the rounds run on
        sizes = [len(p) for p, _ in pieces]
        times = []
        for rep in range(args.warmup + args.reps):
            start = time.perf_counter()
            _, size, _ = unit_rounds(*padded_units(pieces), [t if t is not None else float("inf") for t in thresholds])
            tokens = int((size > 0).sum())
            times.append(time.perf_counter() - start)
        scores = (max(sizes) + 1) // 2 * (max(sizes) // 2)
        rows.append({"window": window, "blocks": len(sizes), "tokens": tokens, "seconds": statistics.median(times[args.warmup:]),
                     "largest_score_matrix_mib": len(sizes) * scores * 4 / 2 ** 20})
    lines = [f"Rounds alone on {args.images[0]} at {args.large} px: {h} x {w} = {h * w} units (metric: each unit's "
             f"pixels, 2352 values); {args.rounds} rounds at thresholds calibrated on the whole image to keep "
             f"{args.keep[0]}; medians of {args.reps} reps", "",
             "| window | blocks | tokens | rounds, s | time vs whole image | score matrices of round 1, MiB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['window'] or 'whole image'} | {r['blocks']} | {r['tokens']} | {r['seconds']:.2f} | "
              f"{r['seconds'] / rows[0]['seconds']:.2f} | {r['largest_score_matrix_mib']:.0f} |" for r in rows]
    publish("qwen_windows", args.device, {"rows": rows, "args": vars(args)}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
