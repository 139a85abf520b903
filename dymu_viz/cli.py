"""``python -m dymu_viz demo``: DToMe on the bundled photos, a token-count table and merge maps."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .calibrate import find_thresholds
from .data import sample_photos, shapes_image
from .models import known_models, load_encoder
from .patch import encode, patch
from .thresholds import Thresholds
from .viz import display_image, normalisation_of, plot_merge_maps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="DToMe on the bundled sample photos: token-count table and merge-map PNGs")
    p.add_argument("--model", default="ViT-L-14-336", help=f"encoder name; known: {', '.join(known_models())}")
    p.add_argument("--pretrained", default="auto",
                   help="'auto' (local weights if cached, else random init), 'random', a tag such as 'openai', or a path")
    p.add_argument("--download", action="store_true", help="allow downloading pretrained weights")
    p.add_argument("--thresholds", type=Path, help="thresholds file (.json, or a reference .pth); "
                   "default: calibrate on the demo images themselves")
    p.add_argument("--target", default="72out", help="'Kout' calibration target when calibrating (default 72out)")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "reverse_linear"])
    p.add_argument("--images", nargs="*", help="subset of the bundled photo names")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--out", type=Path, default=Path("dymu_out"), help="folder for the PNGs and counts.json")


def demo_images(names: Optional[Sequence[str]] = None) -> dict:
    """The bundled photos plus two synthetic extremes (a flat image and one with 12 shapes)."""
    images = sample_photos(list(names) if names else None)
    if not names:
        images.update({"synthetic_flat": shapes_image(0), "synthetic_12_shapes": shapes_image(12)})
    return images


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_encoder(args.model, args.pretrained, args.device, DTYPES[args.dtype], args.download)
    print(f"model   : {loaded.name}")
    print(f"weights : {loaded.weights}")
    images = demo_images(args.images)
    names = list(images)
    pixels = torch.stack([loaded.preprocess(im) for im in images.values()]).to(args.device, DTYPES[args.dtype])
    batches = list(torch.split(pixels, args.batch_size))

    with torch.no_grad():
        if args.thresholds:
            thresholds = Thresholds.load(args.thresholds)
            print(f"thresholds: {args.thresholds} ({thresholds.layers} layers)")
        else:
            thresholds = find_thresholds(loaded.model, [pixels], target=args.target, schedule=args.schedule,
                                         name=loaded.name)
            print(f"thresholds: calibrated on these {len(names)} images as one batch "
                  f"(target {args.target}, {args.schedule} schedule, r per layer {thresholds.r[0]}...)")
        patch(loaded.model, thresholds)
        results = [encode(loaded.model, batch) for batch in batches]

    counts = torch.cat([r.counts.cpu() for r in results])  # (n_images, L + 1)
    depth = counts.shape[1] - 1
    marks = sorted({max(1, round(depth * q)) for q in (0.25, 0.5, 0.75, 1.0)})
    print()
    print(f"{'image':<22} {'in':>5} -> {'out':>4}   " + " ".join(f"{'L' + str(m):>5}" for m in marks))
    for name, row in zip(names, counts.tolist()):
        print(f"{name:<22} {row[0]:>5} -> {row[-1]:>4}   " + " ".join(f"{row[m]:>5}" for m in marks))
    finals = counts[:, -1].tolist()
    spread = statistics.pstdev(finals) if len(finals) > 1 else 0.0
    print(f"{'mean ± std':<22} {counts[0, 0].item():>5} -> {statistics.mean(finals):.1f} ± {spread:.1f}")

    args.out.mkdir(parents=True, exist_ok=True)
    mean, std = normalisation_of(loaded.preprocess)
    offset = 0
    for result in results:
        n = result.counts.shape[0]
        shown = [display_image(pixels[offset + b], mean, std) for b in range(n)]
        for b in range(n):
            fig = plot_merge_maps([shown[b]], result.select(b), [names[offset + b]], layers=marks)
            fig.savefig(args.out / f"{names[offset + b]}.png", dpi=80)
        offset += n
    summary = {"model": loaded.name, "weights": loaded.weights, "thresholds": thresholds.to_dict(),
               "counts": {name: row for name, row in zip(names, counts.tolist())}}
    (args.out / "counts.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {len(names)} merge maps and counts.json to {args.out}/ in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dymu_viz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_demo(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
