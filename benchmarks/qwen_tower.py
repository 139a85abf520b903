"""DToMe inside the Qwen2.5-VL ViT (``vlm.unit_tower``) against the rounds after it alone.

    python benchmarks/qwen.py --tower-flops      # prefill FLOPs at the real 7B shapes
    python benchmarks/qwen.py --tower            # time at a shape with the 7B's tower : LLM proportion
    python benchmarks/qwen.py --tower --metrics  # feature error against the rounds alone, equal counts

Random weights (offline), Qwen2.5-VL-7B's classes and its ViT at the real width. Every setting is
calibrated on the nine bundled photos (``calibrate_rounds``) to the same final share ``--keep`` of
the units:

* rounds: the tower as HF runs it, 4 DToMe rounds after the PatchMerger (today's DyMU on Qwen);
* tower: everything inside the tower, its blocks but the last merging, no rounds;
* tower-early: the same in the first half of the blocks only;
* tower+rounds: the tower keeps sqrt(keep), 2 rounds take it on to keep.

``--tower-flops`` runs the real-depth tower (32 blocks; the LLM is tiny, it does not change the
counts) on each photo alone and counts the whole prefill at the real 7B shapes from what it
measured: the tower's tokens after every block (``unit_tower.qwen_tower_flops``) and the LLM's compact
and virtual lengths (``costs.llm_prefill_flops`` with Qwen2.5-7B's decoder), as ratios to vanilla.

``--tower`` times each photo's prefill (batch 1, interleaved settings, medians of per-repetition
ratios to the unpatched model) on a shape whose tower : LLM linear FLOPs per token are the 7B's
(``--vision-layers`` 4 real blocks : a decoder of ``--text-layers`` 13 x 2048, 0.385 against
5.04 : 13.05 = 0.386): tower (hooks on the ViT), LLM, and the whole forward, each next to its FLOP
ratio. "no merge" runs every block on the compact path without merging (thresholds above any
cosine): the cost of the gathers and scatters alone.

``--metrics`` compares what the LLM receives (each unit's token) with the vanilla tower's unit
features (relative Frobenius error per photo), for each in-tower setting against the rounds
alone at exactly the same token count (ToMe's fixed-r rule, halving until there, on the same keys). With
random weights this measures how faithfully each keeps the features, not answer quality.
"""

from __future__ import annotations

import math
import statistics
import time
from types import SimpleNamespace

import torch

from common import publish

import dymu_viz
from dymu_viz import vlm
from dymu_viz.vlm.costs import llm_prefill_flops
from dymu_viz.vlm.families.qwen_tower import qwen_tower_flops

# Qwen2.5-7B's decoder (Qwen/Qwen2.5-VL-7B-Instruct config.json), for FLOP counts at its real shape.
QWEN25_7B_LLM = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                num_key_value_heads=4, head_dim=128, vocab_size=152064)
PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]


def resized(image, side: int):
    scale = side / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)))


def settings(keep: float, depth: int) -> list[tuple[str, dict]]:
    """(label, calibrate_rounds options) of every setting at final share ``keep``."""
    late = list(range(depth - 1))
    return [("rounds", dict(rounds=4)),
            ("tower", dict(rounds=0, tower_keep=keep, tower_blocks=late)),
            ("tower-early", dict(rounds=0, tower_keep=keep, tower_blocks=late[:max(1, depth // 2)])),
            ("tower+rounds", dict(rounds=2, tower_keep=math.sqrt(keep), tower_blocks=late))]


def calibrated(model, processor, photos: list, keep: float) -> dict:
    depth = len(model.model.visual.blocks)
    return {label: vlm.qwen.calibrate_rounds(model, processor, photos, keep, batch_size=3, progress=False, **options)
            for label, options in settings(keep, depth)}


def prompt_inputs(processor, photo, device: str) -> dict:
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True)
    return {k: v.to(device) for k, v in processor(images=[photo], text=[text], return_tensors="pt").items()}


def tower_tokens(acc: dict) -> list[int] | None:
    """The tower's tokens after every block (the units entering dropped), or None (no merging)."""
    return acc["tower_tokens"][0][1:] if "tower_tokens" in acc else None


def flops(model, inputs: dict, acc: dict, llm) -> dict[str, float]:
    """Tower and LLM prefill FLOPs of one forward from its accounting; ``llm``: the decoder config
    to count the LLM at (the model's own, or the real 7B's)."""
    tower = qwen_tower_flops(model.model.visual, inputs["image_grid_thw"].tolist(), tower_tokens(acc))["total"]
    return {"tower": tower, "llm": llm_prefill_flops(llm, acc["llm_compact_length"], acc["llm_virtual_length"])}


def real_shape_flops(args) -> int:
    """Prefill FLOP ratios at the real 7B shapes from counts measured on the real-depth tower."""
    loaded = vlm.load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", "random", args.device, torch.float32, vision_layers=32,
                          text_layers=1, text_width=256)
    model, processor = loaded.model, loaded.processor
    photos = {name: resized(image, args.side) for name, image in dymu_viz.sample_photos().items()}
    rows = []
    for keep in args.keep:
        found = calibrated(model, processor, list(photos.values()), keep)
        for name, photo in photos.items():
            inputs = prompt_inputs(processor, photo, args.device)
            vlm.patch_vlm(model, None, mode="full")
            with torch.no_grad():
                model(**inputs, use_cache=False)
            vanilla = flops(model, inputs, model.dymu_vlm.last[0], QWEN25_7B_LLM)
            units = model.dymu_vlm.last[0]["image_positions"]
            for label, thresholds in found.items():
                vlm.patch_vlm(model, thresholds)
                with torch.no_grad():
                    model(**inputs, use_cache=False)
                acc = model.dymu_vlm.last[0]
                ours = flops(model, inputs, acc, QWEN25_7B_LLM)
                rows.append({"keep": keep, "setting": label, "image": name, "units": units,
                             "tower_out": acc["encoder_tokens"], "llm_tokens": acc["image_tokens"],
                             "tower_flops": ours["tower"] / vanilla["tower"],
                             "prefill_flops": (ours["tower"] + ours["llm"]) / (vanilla["tower"] + vanilla["llm"]),
                             "tower_share": ours["tower"] / (ours["tower"] + ours["llm"])})
        vlm.unpatch_vlm(model)
    lines = [f"Whole prefill FLOPs at the real Qwen2.5-VL-7B shapes (ViT 32 x 1280, LLM 28 x 3584), counted from "
             f"the per-block counts measured on the real-depth tower (random weights) for the 9 bundled photos at "
             f"{args.side} px, one prompt each; medians over the photos (min-max)", "",
             "| keep | setting | units | tower out | LLM image tokens | tower FLOPs | prefill FLOPs | tower share |",
             "|---|---|---|---|---|---|---|---|"]
    for keep in args.keep:
        for label, _ in settings(keep, 32):
            part = [r for r in rows if r["keep"] == keep and r["setting"] == label]
            cell = lambda key, f="{:.2f}": (f.format(statistics.median(r[key] for r in part))  # noqa: E731
                                            + " (" + f.format(min(r[key] for r in part)) + "-"
                                            + f.format(max(r[key] for r in part)) + ")")
            lines.append(f"| {keep} | {label} | {cell('units', '{:.0f}')} | {cell('tower_out', '{:.0f}')} | "
                         f"{cell('llm_tokens', '{:.0f}')} | {cell('tower_flops')} | {cell('prefill_flops')} | "
                         f"{cell('tower_share')} |")
    publish("qwen_tower_flops", args.device, {"rows": rows, "weights": loaded.weights, "args": vars(args)}, "\n".join(lines))
    return 0


def timed(args) -> int:
    """Tower, LLM and whole-forward time ratios next to their FLOP ratios, at the 7B's proportion."""
    loaded = vlm.load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", "random", args.device, torch.float32,
                          vision_layers=args.vision_layers, text_layers=args.text_layers, text_width=2048)
    model, processor = loaded.model, loaded.processor
    visual, cfg = model.model.visual, model.config.get_text_config()
    tower_per_unit = qwen_tower_flops(visual, [[1, 2, 2]])["linear"]
    llm_per_token = llm_prefill_flops(cfg, 1, 0)
    photos = {name: resized(image, args.side) for name, image in dymu_viz.sample_photos().items()}
    found = {keep: calibrated(model, processor, list(photos.values()), keep) for keep in args.keep}
    clock: dict[str, list[float]] = {"tower": [], "llm": []}
    for key, module in (("tower", visual), ("llm", model.model.language_model)):
        module.register_forward_pre_hook(lambda m, a, k, key=key: clock[key].append(-time.perf_counter()),
                                         with_kwargs=True)
        module.register_forward_hook(lambda m, a, k, o, key=key: clock[key].append(clock[key].pop() + time.perf_counter()),
                                     with_kwargs=True)
    depth = len(visual.blocks)
    modes = [("vanilla", None, None), ("no merge", None, dict(tower=[2.0] * depth))] + \
        [(f"{label}@{keep}", thresholds, None) for keep in args.keep for label, thresholds in found[keep].items()]
    rows = []
    for name in args.images:
        inputs = prompt_inputs(processor, photos[name], args.device)
        times: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in modes}
        counted: dict[str, dict[str, float]] = {}
        vlm.patch_vlm(model, None, mode="full")  # the vanilla counts; vanilla is timed unpatched
        with torch.no_grad():
            model(**inputs, use_cache=False)
        counted["vanilla"] = flops(model, inputs, model.dymu_vlm.last[0], cfg)
        for rep in range(args.warmup + args.reps):
            for label, thresholds, options in modes:
                if label == "vanilla":
                    if "dymu_vlm" in model.__dict__:
                        vlm.unpatch_vlm(model)
                else:
                    vlm.patch_vlm(model, thresholds, **(options or {}))
                start = time.perf_counter()
                with torch.no_grad():
                    model(**inputs, use_cache=False)
                whole = time.perf_counter() - start
                if rep >= args.warmup:
                    times[label].append((whole, clock["tower"][-1], clock["llm"][-1]))
                if label != "vanilla":
                    counted[label] = flops(model, inputs, model.dymu_vlm.last[0], cfg)
                    counted[label]["tokens"] = model.dymu_vlm.last[0]["image_tokens"]
        base = counted["vanilla"]
        for label, _, _ in modes[1:]:
            ratio = lambda i: statistics.median(t[i] / v[i] for t, v in zip(times[label], times["vanilla"]))  # noqa: E731
            c = counted[label]
            rows.append({"image": name, "setting": label, "tokens": c["tokens"], "tower_time": ratio(1),
                         "tower_flops": c["tower"] / base["tower"], "llm_time": ratio(2),
                         "llm_flops": c["llm"] / base["llm"], "forward_time": ratio(0),
                         "forward_flops": (c["tower"] + c["llm"]) / (base["tower"] + base["llm"]),
                         "vanilla_s": statistics.median(t[0] for t in times["vanilla"])})
    lines = [f"Qwen2.5-VL-7B classes, random weights: ViT {args.vision_layers} real blocks (1280 wide), LLM "
             f"{args.text_layers} x 2048; tower : LLM linear FLOPs per token {tower_per_unit / llm_per_token:.3f} "
             f"(7B: 5.04 : 13.05 = 0.386); photos at {args.side} px, batch 1, {args.reps} reps (medians of ratios to "
             "the unpatched model); each cell: time ratio / FLOP ratio", "",
             "| image | setting | image tokens | tower | LLM | whole forward |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['image']} | {r['setting']} | {r['tokens']} | {r['tower_time']:.2f} / {r['tower_flops']:.2f} | "
              f"{r['llm_time']:.2f} / {r['llm_flops']:.2f} | {r['forward_time']:.2f} / {r['forward_flops']:.2f} |"
              for r in rows]
    publish("qwen_tower", args.device, {"rows": rows, "weights": loaded.weights, "args": vars(args)}, "\n".join(lines))
    return 0


def fixed_rounds(units: int, tokens: int, rounds: int = 8) -> tuple[int, ...]:
    """ToMe's r per round taking ``units`` to exactly ``tokens``: each round merges as many as are
    left to merge, at most half its tokens."""
    left, current, r = units - tokens, units, []
    for _ in range(rounds):
        step = min(left, current // 2)
        r.append(step)
        left, current = left - step, current - step
    if left:
        raise ValueError(f"{rounds} rounds cannot take {units} units to {tokens}")
    return tuple(r)


def feature_errors(args) -> int:
    """Per photo: each unit's token against its vanilla feature, in-tower settings against the rounds
    alone at the same token count."""
    from dymu_viz.vlm.families.qwen2_vl import piece_reductions, tower_units
    from dymu_viz.vlm.reductions import ToMe

    loaded = vlm.load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", "random", args.device, torch.float32,
                          vision_layers=args.vision_layers, text_layers=1, text_width=256)
    model, processor = loaded.model, loaded.processor
    photos = {name: resized(image, args.side) for name, image in dymu_viz.sample_photos().items()}
    rows = []
    for keep in args.keep:
        found = calibrated(model, processor, list(photos.values()), keep)
        for name in args.images:
            pixels = processor.image_processor(images=[photos[name]], return_tensors="pt")
            pv, grid = pixels["pixel_values"].to(args.device), pixels["image_grid_thw"].to(args.device)
            vlm.patch_vlm(model, None, mode="full")
            with torch.no_grad():
                (units,) = tower_units(model, pv, grid)  # vanilla features and the rounds' keys
            vanilla = units[0]
            error = lambda t: float((t.features[t.mapping] - vanilla).norm() / vanilla.norm())  # noqa: E731
            for label, thresholds in found.items():
                vlm.patch_vlm(model, thresholds)
                with torch.no_grad():
                    (tokens,) = vlm.qwen.qwen_images(model, pv, grid, model.dymu_vlm.unit_thresholds)
                n = len(tokens.features)
                (same, rows_of), = piece_reductions([units], [(int(grid[0, 1]) // 2, int(grid[0, 2]) // 2)], [pv],
                                                   ToMe(fixed_rounds(len(vanilla), n)))
                rows.append({"keep": keep, "image": name, "setting": label, "units": len(vanilla), "tokens": n,
                             "error": error(tokens), "rounds_alone_error": float(
                                 (same[rows_of] - vanilla).norm() / vanilla.norm())})
    vlm.unpatch_vlm(model)
    lines = [f"What the LLM receives against the vanilla tower's unit features (relative Frobenius error per photo): "
             f"each setting, calibrated to keep on the 9 bundled photos, against the rounds alone at exactly its "
             f"token count (fixed r, halving until there, same keys); Qwen2.5-VL-7B classes, random weights, ViT "
             f"{args.vision_layers} of 32 blocks; photos at {args.side} px", "",
             "| keep | image | setting | units | tokens | error | rounds alone, same tokens |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['keep']} | {r['image']} | {r['setting']} | {r['units']} | {r['tokens']} | {r['error']:.3f} | "
              f"{r['rounds_alone_error']:.3f} |" for r in rows]
    publish("qwen_tower_metric", args.device, {"rows": rows, "weights": loaded.weights, "args": vars(args)},
            "\n".join(lines))
    return 0
