"""Command line: ``python -m dymu_viz demo | calibrate | calibrate-rounds``.

demo              DToMe on the bundled photos: a token-count table and merge-map PNGs.
calibrate         threshold finding on an image set (JSON list or folder); also under torchrun.
calibrate-rounds  the same for the DToMe rounds after the tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .calibrate import find_thresholds
from .data import calibration_photos, sample_photos, shapes_image
from .models import DTYPES, known_models, load_encoder
from .patch import encode, patch
from .thresholds import Thresholds
from .stats import count_table, quarter_layers
from .viz import display_image, normalisation_of, plot_merge_maps


def _count(least: int):
    """An argparse type: an integer of at least ``least``, else a clear usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is too small: give at least {least}")
        return value
    return parse


def _model_arguments(p: argparse.ArgumentParser, **model: object) -> None:
    """--model / --pretrained / --download / --quick-gelu, shared by the subcommands."""
    p.add_argument("--model", help=f"encoder name or a local HF folder; known: {', '.join(known_models())}", **model)
    p.add_argument("--pretrained", default="auto",
                   help="'auto' (local weights if cached, else random init), 'random', a tag such as 'openai', or a path")
    p.add_argument("--download", action="store_true", help="allow downloading pretrained weights")
    p.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                   help="open_clip models: the MLP activation of the weights (default: the one the weights were "
                        "trained with; QuickGELU for OpenAI CLIP names, also for random init and checkpoint files)")


def _load(args: argparse.Namespace, device: object, dtype: torch.dtype):
    return load_encoder(args.model, args.pretrained, device, dtype, args.download, args.quick_gelu)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="DToMe on the bundled sample photos: token-count table and merge-map PNGs")
    _model_arguments(p, default="ViT-L-14-336")
    p.add_argument("--thresholds", type=Path, help="thresholds file (.json, or a reference .pth); "
                   "default: calibrate on the bundled calibration pictures (never the demo images)")
    p.add_argument("--target", default="72out", help="'Kout' calibration target when calibrating (default 72out)")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "reverse_linear"])
    p.add_argument("--images", nargs="*", help="subset of the bundled photo names")
    p.add_argument("--batch-size", type=_count(1), default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--out", type=Path, default=Path("dymu_out"), help="folder for the PNGs and counts.json")


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="find DToMe thresholds on an image set (works under torchrun)")
    _model_arguments(p, required=True)
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--json", type=Path, help='reference-format list: [{"image": "relative/path.jpg"}, ...]')
    data.add_argument("--folder", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--image-root", type=Path, help="folder the JSON paths are relative to (default: the JSON's folder)")
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--target", help="'Kout' preset: about K output tokens per image, e.g. 72out, 192out")
    amount.add_argument("--r-total", type=_count(0), help="total merges over all layers")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "reverse_linear"])
    p.add_argument("--batch-size", type=_count(1), default=64, help="images per batch and process (the reference used 64)")
    p.add_argument("--out", type=Path, required=True, help="thresholds JSON to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--checkpoint-every", type=_count(1), default=20, help="batches between checkpoints")
    p.add_argument("--workers", type=_count(0), default=2, help="DataLoader worker processes")
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) when available, else cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--heldout-json", type=Path, help="a held-out image list to report realized token counts on")
    p.add_argument("--heldout-root", type=Path)
    p.add_argument("--no-report", action="store_true", help="skip the realized token-count pass")
    p.add_argument("--export-pth", type=Path, help="also write the thresholds as a reference-layout .pth")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _start_processes(args: argparse.Namespace) -> tuple[str, int, torch.dtype]:
    """(device, rank, dtype) of this process; under torchrun the process group is started (NCCL
    on GPUs, gloo on CPUs) and each rank gets its own GPU."""
    import torch.distributed as dist

    from .calibrate import rank_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and args.device in (None, "cuda")
    device = rank_device("cuda" if cuda else (args.device or "cpu"))  # each rank its own GPU, made current
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return device, rank, DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]


def _end_processes() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _check_output(out: Path, overwrite: bool, resume: bool) -> None:
    """An existing output is replaced only with --overwrite; --resume continues an interrupted
    run (its checkpoints beside the output), never recomputes a finished one."""
    from .calibrate import checkpoint_paths
    if out.exists() and not overwrite:
        if not resume:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it or --resume to continue")
        if not checkpoint_paths(out):
            raise FileExistsError(f"{out} is a finished calibration (no checkpoints beside it to resume); "
                                  f"pass --overwrite to compute it again")


def run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import (CalibrationJob, encoder_state, n_patches_of, remove_checkpoints, resolve_r,
                            run_calibration, token_report)
    from .dataset import list_images

    device, rank, dtype = _start_processes(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        _check_output(args.out, args.overwrite, args.resume)
        paths, skipped = list_images(args.json or args.folder, args.image_root)
        torch.manual_seed(0)  # random init (no weights given): the same weights in every process
        loaded = _load(args, device, dtype)
        say(f"model   : {loaded.name}\nweights : {loaded.weights}")
        state = encoder_state(loaded.model)
        r_total, rs = resolve_r(state.depth, n_patches_of(state), args.r_total, args.target, args.schedule)
        say(f"data    : {len(paths)} images ({skipped} JSON entries without an image skipped), "
            f"batch {args.batch_size} x {world} process(es)")
        say(f"schedule: {args.schedule}, r_total {r_total}, r per layer {rs}")
        if args.overwrite and not args.resume:
            remove_checkpoints(args.out)
        job = CalibrationJob(loaded.model, loaded.preprocess, paths, rs, args.out, args.batch_size, loaded.name,
                             args.schedule, r_total, device, dtype, args.workers, args.checkpoint_every, args.resume,
                             not args.quiet)
        thresholds, progress = run_calibration(job)
        reports = {}
        if not args.no_report:
            reports["calibration"] = token_report(loaded.model, thresholds, paths, loaded.preprocess, args.batch_size,
                                                  device, dtype, args.workers, not args.quiet, "calibration set")
            if args.heldout_json:
                held, _ = list_images(args.heldout_json, args.heldout_root)
                reports["heldout"] = token_report(loaded.model, thresholds, held, loaded.preprocess, args.batch_size,
                                                  device, dtype, args.workers, not args.quiet, "held-out set")
        if rank == 0:
            thresholds.metadata["reports"] = {k: {f: v for f, v in r.items() if f != "per_image"} for k, r in reports.items()}
            thresholds.save(args.out)
            report_path = args.out.with_name(args.out.stem + ".report.json")
            report_path.write_text(json.dumps({"failures": [{"image": str(paths[i]), "error": e} for i, e in
                                                            sorted(progress.failures)], **reports}, indent=1) + "\n")
            if args.export_pth:
                thresholds.save_reference_checkpoint(args.export_pth, state.adapter.reference_prefix)
            remove_checkpoints(args.out)
            say(f"thresholds: {', '.join(f'{v:.4f}' for v in thresholds.values)}")
            for kind, rep in reports.items():
                say(f"{kind:<12}: {rep['mean']:.1f} ± {rep['std']:.1f} tokens per image "
                    f"(min {rep['min']}, median {rep['median']:.0f}, max {rep['max']}; {rep['n_images']} images)")
            if progress.failures:
                say(f"skipped {len(progress.failures)} unreadable image(s):")
                for i, err in sorted(progress.failures):
                    say(f"  {paths[i]}: {err}")
            say(f"wrote {args.out} and {report_path}" + (f" and {args.export_pth}" if args.export_pth else ""))
        return 0
    finally:
        _end_processes()


def _calibrate_rounds_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-rounds", help="find the thresholds of the DToMe rounds after the tower (Qwen2-VL, "
                                                "Qwen2.5-VL, Qwen3-VL, InternVL3) on an image set (works under torchrun)")
    p.add_argument("--model", required=True, help="a known id (e.g. Qwen/Qwen2.5-VL-7B-Instruct, "
                                                  "OpenGVLab/InternVL3-8B-hf) or a local folder")
    p.add_argument("--pretrained", default="auto", help="'auto', 'random', 'pretrained' or a local folder")
    p.add_argument("--download", action="store_true", help="allow downloading the weights")
    p.add_argument("--vision-layers", type=_count(1), help="random init only: ViT blocks to build (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random init: the same weights in every process")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--json", type=Path, help='reference-format list: [{"image": "relative/path.jpg"}, ...]')
    data.add_argument("--folder", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--image-root", type=Path, help="folder the JSON paths are relative to (default: the JSON's folder)")
    p.add_argument("--keep", type=float, required=True, help="share of the units that survives, e.g. 0.3")
    p.add_argument("--rounds", type=_count(0), default=4, help="DToMe rounds (each can at most halve the tokens)")
    p.add_argument("--metric", default="keys", choices=["keys", "blocks", "features"],
                   help="the rounds' similarity (dymu_viz.vlm.qwen.METRICS); recorded in the output")
    p.add_argument("--window", type=_count(1), help="match only inside blocks of this many x this many units (large "
                                              "images; recorded in the output); default: the whole image")
    p.add_argument("--tower-keep", type=float, help="Qwen-VL: also merge whole units inside the ViT, keeping this "
                                                    "share of the units at its output (--keep is then reached by the "
                                                    "rounds after it; --rounds 0 for none)")
    p.add_argument("--tower-blocks", type=int, nargs="+", help="the ViT blocks that merge (default: every block)")
    p.add_argument("--batch-size", type=_count(1), default=8, help="images per batch and process")
    p.add_argument("--out", type=Path, required=True, help="thresholds JSON to write (checkpoints go beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--checkpoint-every", type=_count(1), default=5, help="batches between checkpoints")
    p.add_argument("--device", default=None, help="default: cuda (this rank's GPU) when available, else cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_calibrate_rounds(args: argparse.Namespace) -> int:
    from .dataset import list_images
    from .vlm import FAMILIES, family_of, load_vlm

    device, rank, dtype = _start_processes(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        _check_output(args.out, args.overwrite, args.resume)
        paths, skipped = list_images(args.json or args.folder, args.image_root)
        torch.manual_seed(args.seed)
        loaded = load_vlm(args.model, args.pretrained, device, dtype, args.download, vision_layers=args.vision_layers)
        family = family_of(loaded.model)
        if not family.rounds:
            served = [c for f in FAMILIES.values() if f.rounds for c in f.classes]
            raise ValueError(f"{args.model} is a {type(loaded.model).__name__}; calibrate-rounds is for "
                             f"{', '.join(served)} (use calibrate for encoder towers)")
        say(f"model     : {loaded.name}\nweights   : {loaded.weights}\ndata      : {len(paths)} images "
            f"({skipped} JSON entries without an image skipped)")
        tower = {"tower_keep": args.tower_keep, "tower_blocks": args.tower_blocks}
        thresholds = family.calibrate_rounds(loaded.model, loaded.processor, paths, args.keep, args.rounds,
                                             args.batch_size, progress=not args.quiet, metric=args.metric,
                                             window=args.window, out=args.out, resume=args.resume,
                                             checkpoint_every=args.checkpoint_every,
                                             **{k: v for k, v in tower.items() if v is not None})
        if rank == 0:
            thresholds.model = loaded.name
            thresholds.save(args.out)
            say(f"thresholds: {', '.join(f'{v:.4f}' for v in thresholds.values)} "
                f"(mean merges per image and round: {thresholds.r})")
            if "tower" in thresholds.metadata and "keep" in thresholds.metadata["tower"]:
                blocks = thresholds.metadata["tower"]
                say("tower     : " + ", ".join(f"block {k} {v:.4f}" for k, v in enumerate(blocks["values"])
                                           if v is not None) + f" (mean merges per image: {blocks['merges']})")
            for i, err in thresholds.metadata["failures"]:
                say(f"skipped {paths[i]}: {err}")
            say(f"wrote {args.out}")
        return 0
    finally:
        _end_processes()


def demo_images(names: Optional[Sequence[str]] = None) -> dict:
    """The bundled photos plus two synthetic extremes (a flat image and one with 12 shapes)."""
    images = sample_photos(list(names) if names else None)
    if not names:
        images.update({"synthetic_flat": shapes_image(0), "synthetic_12_shapes": shapes_image(12)})
    return images


def run_demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    torch.manual_seed(0)
    loaded = _load(args, args.device, DTYPES[args.dtype])
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
            calibration = calibration_photos()  # never the images encoded: see data.CALIBRATION_PHOTOS
            batch = torch.stack([loaded.preprocess(im) for im in calibration.values()]).to(args.device, DTYPES[args.dtype])
            thresholds = find_thresholds(loaded.model, [batch], target=args.target, schedule=args.schedule,
                                         name=loaded.name)
            print(f"thresholds: calibrated on the {len(calibration)} bundled calibration pictures as one batch "
                  f"(target {args.target}, {args.schedule} schedule, r per layer {thresholds.r[0]}...)")
        patch(loaded.model, thresholds)
        results = [encode(loaded.model, batch) for batch in batches]

    counts = torch.cat([r.counts.cpu() for r in results])  # (n_images, L + 1)
    marks = quarter_layers(counts.shape[1] - 1)
    print()
    print(count_table(counts, names, marks))

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dymu_viz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _calibrate_parser(sub)
    _calibrate_rounds_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"demo": run_demo, "calibrate": run_calibrate, "calibrate-rounds": run_calibrate_rounds}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
