"""Stage-by-stage cost of LLaVA-1.5 with DyMU against full and the matched-budget baselines.

    python benchmarks/stages.py            # CPU: real-width tower (--vision-layers of 24), LLM 4 x 1024

Random weights (offline): LLaVA-1.5-7B's classes, its CLIP ViT-L/14-336 tower at the real width
with ``--vision-layers`` blocks, the LLM scaled to 4 layers x 1024. DyMU uses one threshold
``--tau`` in every tower layer; ToMe (fixed r) and 2-D pooling are then sized to DyMU's mean
image tokens on the bundled photos (``vlm.baselines.match_budget``). Each photo of ``--images``
is generated alone (batch 1, ``--new-tokens`` greedy tokens) in every setting, and
``vlm.costs.stage_costs`` splits the time into vision / LLM prefill / decode (medians of
``--reps`` after ``--warmup``), with FLOPs per stage from the measured counts. The table flags any
setting slower than full on the same photo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, publish  # noqa: E402

import dymu_viz  # noqa: E402
from dymu_viz import vlm  # noqa: E402
from dymu_viz.vlm import baselines, costs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, reps=3, warmup=1)
    p.add_argument("--vision-layers", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.85, help="DyMU's threshold in every tower layer")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--images", nargs="+", default=["chelsea", "rocket"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    loaded = vlm.load_vlm("llava-hf/llava-1.5-7b-hf", "random", args.device, torch.float32,
                          vision_layers=args.vision_layers, text_layers=4, text_width=1024)
    model, processor = loaded.model, loaded.processor
    photos = dymu_viz.sample_photos()
    vlm.patch_vlm(model, args.tau)
    target = baselines.mean_image_tokens(model, processor, list(photos.values()))
    tome = baselines.match_budget(model, processor, list(photos.values()), target, "tome")
    pool = baselines.match_budget(model, processor, list(photos.values()), target, "pool")
    settings = [("full", None, "full"), ("dymu vtu", args.tau, "vtu"), ("dymu compact", args.tau, "compact"),
                ("tome vtu", tome, "vtu"), ("pool vtu", pool, "vtu"), ("pool compact", pool, "compact")]
    rows = []
    for name in args.images:
        prompt = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "describe the image"}]}], add_generation_prompt=True)
        inputs = dict(processor(images=[photos[name]], text=[prompt], return_tensors="pt"))
        for label, spec, mode in settings:
            vlm.patch_vlm(model, spec, mode=mode)
            row = costs.stage_costs(model, inputs, args.new_tokens, args.warmup, args.reps)
            rows.append({"sample": name, "setting": label, **row})
    head = (f"LLaVA-1.5-7B classes, random weights: CLIP-L/14-336 tower {args.vision_layers} of 24 blocks, LLM 4 x 1024; "
            f"batch 1, {args.new_tokens} new tokens, medians of {args.reps}; DyMU tau {args.tau} in every layer "
            f"(mean {target:.1f} image tokens on the 9 bundled photos); matched ToMe r = {list(tome.r)[:3]}... "
            f"({tome.measured:.1f}), pooling {pool.rows} x {pool.cols} ({pool.measured:.1f})")
    publish("stages", args.device, {"rows": rows, "weights": loaded.weights, "args": vars(args)},
            head + "\n\n" + costs.cost_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
