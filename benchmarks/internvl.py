"""InternVL3: where should DToMe run? Rounds after the projector against DToMe inside InternViT.

    python benchmarks/internvl.py              # CPU: real-width InternViT (2 of 24 blocks), 448 px tiles

Random weights (offline): InternVL3-8B's classes with its tower at the real width and
``--vision-layers`` blocks. Every bundled photo is cut into tiles by the processor (1 to
``--max-tiles`` crops plus the thumbnail). For each setting, per photo: the units the LLM gets
(compact tokens over 256 units per tile) and the relative error of what it reads at every
placeholder (each unit's compact token against vanilla's unit, Frobenius norm over the image):

* "rounds": DToMe rounds on the projected units (the family's default), calibrated on the same
  photos to each ``--keep`` share;
* "tower": DToMe inside InternViT at one threshold for every layer (``--taus``), then units made
  of the same four tokens merged (``vlm.families.internvl.tower_tokens``).

The comparison is at equal token counts: error against the kept share. With random weights this
says how well each place groups *similar features*, not which answers better.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parser, publish  # noqa: E402

from dymu_viz import sample_photos, vlm  # noqa: E402
from dymu_viz.vlm.families import internvl  # noqa: E402


def relative_error(tokens: list[tuple[torch.Tensor, torch.Tensor]], vanilla: torch.Tensor) -> float:
    """||each unit's compact token - its vanilla unit|| / ||vanilla units|| over one image's tiles."""
    read = torch.stack([compact[rows] for compact, rows in tokens])
    return float((read - vanilla).norm() / vanilla.norm())


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--max-tiles", type=int, default=2)
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    p.add_argument("--taus", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.6, 0.3, -1.0])
    args = p.parse_args()
    torch.manual_seed(0)
    loaded = vlm.load_vlm("OpenGVLab/InternVL3-8B-hf", "random", args.device, vision_layers=args.vision_layers,
                          text_layers=1, text_width=256)
    model, processor = loaded.model, loaded.processor
    processor.image_processor.max_patches = args.max_tiles
    photos = sample_photos()
    tiles = {name: processor.image_processor(images=[im], return_tensors="pt")["pixel_values"].to(args.device)
             for name, im in photos.items()}
    rows = []
    with torch.no_grad():
        vanilla = {name: internvl.vision_units(model, t) for name, t in tiles.items()}
        for keep in args.keep:
            thresholds = internvl.calibrate_rounds(model, processor, list(photos.values()), keep, rounds=4,
                                                   batch_size=3, progress=False)
            for name, t in tiles.items():
                tokens = internvl.round_tokens(model, t, thresholds.values, "keys")
                rows.append(dict(placement="rounds", setting=f"keep {keep}", photo=name,
                                 kept=sum(len(c) for c, _ in tokens) / vanilla[name].shape[:2].numel(),
                                 error=relative_error(tokens, vanilla[name])))
        for tau in args.taus:
            vlm.patch_vlm(model, tau)
            for name, t in tiles.items():
                tokens = internvl.tower_tokens(model, t)
                rows.append(dict(placement="tower", setting=f"tau {tau:g}", photo=name,
                                 kept=sum(len(c) for c, _ in tokens) / vanilla[name].shape[:2].numel(),
                                 error=relative_error(tokens, vanilla[name])))
    lines = [f"{loaded.weights}; {len(photos)} bundled photos, 1 to {args.max_tiles} tiles + thumbnail each.", "",
             "| placement | setting | mean kept share | min-max kept | mean relative error |", "|---|---|---|---|---|"]
    for placement, setting in dict.fromkeys((r["placement"], r["setting"]) for r in rows):
        group = [r for r in rows if (r["placement"], r["setting"]) == (placement, setting)]
        kept = [r["kept"] for r in group]
        lines.append(f"| {placement} | {setting} | {statistics.fmean(kept):.3f} | {min(kept):.3f}-{max(kept):.3f} | "
                     f"{statistics.fmean(r['error'] for r in group):.4f} |")
    publish("internvl", args.device, {"rows": rows, "weights": loaded.weights, "args": vars(args)}, "\n".join(lines))


if __name__ == "__main__":
    main()
