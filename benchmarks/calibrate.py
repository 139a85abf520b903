"""Calibration throughput against a plain encoder forward at the same batch size.

    python benchmarks/calibrate.py [--model ViT-B-16] [--batch-size 16] [--images 64]

Three figures, medians over repetitions after a warm-up, in one run:
* plain: the unpatched encoder on preloaded batches (images/s);
* step: the calibration step (batch-level top-B*r merging) on the same preloaded batches;
* job: the whole calibration job from image files on disk (DataLoader workers, checkpoints).
Target: job >= 0.9 x plain. Results go to benchmarks/results/calibrate_<device>.json and the
table in benchmarks/README.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import dymu_viz
from dymu_viz.calibrate import CalibrationJob, batch_thresholds, encoder_state, n_patches_of, resolve_r, run_calibration
from dymu_viz.data import sample_photos, shapes_image
from dymu_viz.dataset import load_rgb
from dymu_viz.patch import get_state
from dymu_viz.models import load_encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, publish  # noqa: E402


def write_images(folder: Path, n: int) -> list[Path]:
    """n JPEG files of mixed content: crops of the bundled photos and synthetic shapes."""
    photos = list(sample_photos().values())
    paths = []
    for i in range(n):
        if i % 3 == 2:
            image = shapes_image(i % 40, size=400, seed=i)
        else:
            photo = photos[i % len(photos)]
            w, h = photo.size
            k = (i // len(photos)) % 3
            image = photo.crop((k * w // 8, k * h // 8, w - k * w // 8, h - k * h // 8))
        paths.append(folder / f"{i:04d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def rate(fn, n_images: int) -> float:
    """Images per second of one call of fn."""
    start = time.perf_counter()
    fn()
    return n_images / (time.perf_counter() - start)


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--target", default="50out")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = load_encoder(args.model, "random", args.device)
    model = loaded.model
    state = encoder_state(model)
    _, rs = resolve_r(state.depth, n_patches_of(state), target=args.target)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.images)
        pixels = torch.stack([loaded.preprocess(load_rgb(q)) for q in paths]).to(args.device)
        batches = list(torch.split(pixels, args.batch_size))

        def plain():
            if get_state(model) is not None:
                dymu_viz.unpatch(model)
            for b in batches:
                model.encode_image(b)

        def step():
            for b in batches:
                batch_thresholds(model, b, rs)

        def job():
            out = Path(tmp) / "th.json"
            run_calibration(CalibrationJob(model, loaded.preprocess, paths, rs, out, args.batch_size, args.model,
                                           workers=args.workers, progress_bar=False, device=args.device))

        rates = {}
        for _ in range(args.warmup + args.reps):  # interleave the three so noise hits them alike
            for name, fn in (("plain", plain), ("step", step), ("job", job)):
                rates.setdefault(name, []).append(rate(fn, args.images))
        rates = {k: statistics.median(v[args.warmup:]) for k, v in rates.items()}
    row = {"model": args.model, "target": args.target, "batch": args.batch_size, "images": args.images,
           "workers": args.workers, "device": args.device, "images_per_s": rates,
           "step_over_plain": rates["step"] / rates["plain"], "job_over_plain": rates["job"] / rates["plain"]}
    print(json.dumps(row))
    table = ("| model | batch | images | plain im/s | calibration step im/s | whole job im/s (from disk) "
             "| step / plain | job / plain |\n|---|---|---|---|---|---|---|---|\n"
             f"| {args.model} ({args.target}) | {args.batch_size} | {args.images} | {rates['plain']:.2f} "
             f"| {rates['step']:.2f} | {rates['job']:.2f} | {row['step_over_plain']:.2f} | {row['job_over_plain']:.2f} |")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "row": row}
    publish("calibrate", args.device, results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
