"""Every GPU figure in one run: DToMe encoders, LLaVA-1.5-7B prefill and decode with VTU,
LLaVA-OneVision-7B and Qwen2.5-VL-7B end to end, and the SDPA backend of every attention call.

    python benchmarks/gpu.py --out DIR                    # one CUDA GPU, bfloat16, the real shapes
    python benchmarks/gpu.py --out DIR --smoke            # tiny shapes, a few steps, runs on a CPU (CI)
    python benchmarks/gpu.py --out DIR --only encoder     # one section (repeat --only for more)

Random weights of the real architectures (HF classes built from their configs on the device, no
open_clip), photos bundled with scikit-image. Sections, the most important figures first:

* encoder: HF ``CLIPVisionModel`` of ViT-L-14-336 (QuickGELU) with the reference's published
  72out thresholds at batch 1 (astronaut), 16 and 64 (photos and shape images), and HF
  ``SiglipVisionModel`` SO400M-384 with thresholds calibrated on the same 16 images (72out) at
  batch 16: unpatched, patched with merging off, DToMe; DToMe's speed-up against the FLOP bound
  of its measured per-layer token counts (``stats.flop_ratio``);
* llava: LLaVA-1.5-7B (CLIP-L-336 tower read at layer -2, Llama 32 x 4096). Its language model,
  as ``vlm.py`` measures it on a CPU: prefill at 576 / 394 / 195 / 89 image tokens (full, VTU with
  both cache policies, w/o VTU, FLOP-equivalent) with peak memory and KV bytes; then the whole
  model on one photo (tower included, ``vlm.costs.stage_costs``: full, DyMU with VTU, DyMU w/o VTU,
  published 72out thresholds); then decoding: per step and prefill + ``--decode-steps`` steps
  for full, VTU compact cache, VTU decode-fast and w/o VTU at batch 1 and 8;
* onevision: LLaVA-OneVision-7B (SO400M tower, Qwen2-7B) on one AnyRes photo, tower thresholds
  calibrated to 72out on scikit-image's calibration pictures, ``stage_costs`` as above;
* qwen: Qwen2.5-VL-7B (its 32-block ViT, Qwen2.5-7B) on one photo at 672 px, four DToMe rounds
  after the tower calibrated to keep 0.3, ``stage_costs`` as above; and merging inside the ViT
  (``vlm.unit_tower``: half the units leave the tower, two rounds take them to 0.3), its
  attention on the virtual layout through the tower's own SDPA / FlashAttention calls.

Timing: modes run interleaved within every repetition, warm-up repetitions are thrown away
(``Plan.warmup``), ratios are medians of the per-repetition (paired) ratios; decoding runs one
repetition whose steps are interleaved step by step, its ratios medians over the step pairs.
Marks are CUDA events on a GPU and ``perf_counter`` on a CPU (``vlm.costs``' clock).

Routes: each section runs one call of every attention kind it timed once more, counting its
``F.scaled_dot_product_attention`` calls (a torch function mode) and the fused kernels they reach
(flash / memory-efficient / cuDNN: aten ops seen by a dispatch mode; a call that reaches none ran
on the math kernel), with VTU's own route counters. Any call on the math kernel fails the run
(exit 1), as does a section that raised (its traceback goes into the JSON; the next section
still runs).

Output: DIR/gpu.json (machine, versions, settings, every row, the routes) and DIR/gpu.md (the
same as tables), both rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # this tree's dymu_viz, installed or not

import vlm as llm_bench  # noqa: E402
from common import DTYPES, paired  # noqa: E402
from qwen import resized  # noqa: E402

import dymu_viz  # noqa: E402
from dymu_viz import vlm  # noqa: E402
from dymu_viz.calibrate import find_thresholds  # noqa: E402
from dymu_viz.data import calibration_photos, sample_photos, shapes_image  # noqa: E402
from dymu_viz.models import HF_MODELS, image_transform  # noqa: E402
from dymu_viz.stats import flop_ratio, padded_flop_overhead  # noqa: E402
from dymu_viz.versions import TESTED_TRANSFORMERS, UNTESTED_OK, check_transformers  # noqa: E402
from dymu_viz.vlm.costs import Clock, cost_table, stage_costs  # noqa: E402
from dymu_viz.vlm.models import VLM_MODELS  # noqa: E402
from dymu_viz.vtu import VTUState, cache_bytes, find_decoder  # noqa: E402

SECTIONS = ("encoder", "llava", "onevision", "qwen")
CLIP_L, SO400M = "openai/clip-vit-large-patch14-336", "google/siglip-so400m-patch14-384"
LLAVA, ONEVISION = "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf"
QWEN = "Qwen/Qwen2.5-VL-7B-Instruct"
# scikit-image's photos only: the GPU machine has neither scikit-learn nor matplotlib
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
CALIBRATION = ["camera", "coins", "brick", "grass"]  # disjoint from PHOTOS (``data.CALIBRATION_PHOTOS``)
KERNELS = ("flash", "memory_efficient", "cudnn", "other")  # the fused ones; "math" is what reaches none


def real_llm(model_id: str, intermediate: int, heads: int, kv_heads: int, **more: Any) -> dict[str, Any]:
    """The text config of ``model_id``'s real LLM: layers, width and vocabulary from its
    ``VLMSpec``, the rest given (head dim = width / heads)."""
    layers, width, vocab = VLM_MODELS[model_id].llm_shape
    return dict(num_hidden_layers=layers, hidden_size=width, vocab_size=vocab, intermediate_size=intermediate,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=width // heads, **more)


def tiny_llm(kv_heads: int) -> dict[str, Any]:
    """A 2 x 128 LLM of head dim 64 (the random builds' head dim, so M-RoPE sections still fit)."""
    return dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                num_key_value_heads=kv_heads, head_dim=64)


@dataclass(frozen=True)
class Plan:
    """What one run measures: shapes (config overrides; empty: the real ones), sizes, repetitions."""

    encoder_shape: dict[str, Any]  # overrides of the HF_MODELS vision configs
    encoder_batches: tuple[int, ...]  # ViT-L-14-336; SigLIP runs at the second one
    towers: dict[str, dict[str, Any]]  # per VLM: overrides of its tower's config
    vision_layers: dict[str, int | None]  # per VLM: tower blocks built (None: all)
    llms: dict[str, dict[str, Any]]  # per VLM: its LLM's text config
    decode_batches: tuple[int, ...]
    decode_steps: int
    new_tokens: int  # per generate of the whole-model rows
    onevision_side: int  # the OneVision photo's longest side, px (its AnyRes grid follows)
    qwen_side: int  # the Qwen photo's longest side, px
    reps: int
    warmup: int
    decode_reps: int


FULL = Plan(
    encoder_shape={}, encoder_batches=(1, 16, 64), towers={}, vision_layers={},
    llms={LLAVA: real_llm(LLAVA, 11008, 32, 32),
          ONEVISION: real_llm(ONEVISION, 18944, 28, 4),
          QWEN: real_llm(QWEN, 18944, 28, 4,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})},
    decode_batches=(1, 8), decode_steps=128, new_tokens=16, onevision_side=512, qwen_side=672, reps=5, warmup=2,
    decode_reps=1)
TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2)
SMOKE = Plan(
    encoder_shape=dict(TINY_VIT, image_size=168, num_hidden_layers=4), encoder_batches=(1, 2, 4),
    towers={LLAVA: TINY_VIT, ONEVISION: TINY_VIT, QWEN: dict(hidden_size=64, intermediate_size=128, num_heads=2)},
    vision_layers={LLAVA: 4, ONEVISION: 2, QWEN: 2},
    llms={LLAVA: tiny_llm(2), ONEVISION: dict(tiny_llm(1), num_hidden_layers=3),  # deeper than the stand-in LLM
          QWEN: tiny_llm(1)},
    decode_batches=(1, 2), decode_steps=2, new_tokens=3, onevision_side=384, qwen_side=224, reps=1, warmup=1,
    decode_reps=1)


class Mode(NamedTuple):
    """One timed mode: ``prepare`` and ``after`` run untimed around the timed ``run``."""

    prepare: Callable[[], Any]
    run: Callable[[], Any]
    after: Callable[[], Any] = lambda: None


@dataclass
class Run:
    """One run: its plan, device and dtype, clock, and the report it fills."""

    plan: Plan
    device: str
    dtype: torch.dtype
    report: Report
    clock: Any = field(init=False)

    def __post_init__(self) -> None:
        self.clock = Clock(torch.device(self.device))

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def interleaved(self, modes: dict[str, Mode], reps: int, warmup: int) -> dict[str, list[float]]:
        """Seconds of each mode's ``run`` per repetition, the modes interleaved in every repetition;
        the first ``warmup`` repetitions are dropped."""
        marks: dict[str, list[tuple[Any, Any]]] = {m: [] for m in modes}
        for rep in range(warmup + reps):
            for name, mode in modes.items():
                mode.prepare()
                start = self.clock.mark()
                mode.run()
                end = self.clock.mark()
                mode.after()
                if rep >= warmup:
                    marks[name].append((start, end))
        return {m: [self.clock.seconds(a, b) for a, b in v] for m, v in marks.items()}

    def peak_start(self) -> int:
        """Reset the peak-memory counter; bytes allocated now (CUDA; 0 on a CPU)."""
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_growth(self, start: int) -> int | None:
        """Peak bytes allocated above ``start`` since ``peak_start`` (None on a CPU)."""
        return torch.cuda.max_memory_allocated() - start if self.cuda else None


def published_72out(layers: int) -> dymu_viz.Thresholds:
    """The reference's published ViT-L-14-336 72out thresholds for a tower of ``layers`` blocks
    (all 24 at the real shape, the first ones for the smoke run's shallower towers)."""
    return dymu_viz.Thresholds.published("ViT-L-14-336-tome-72out").truncated(layers)


# ---------------------------------------------------------------------------------------------
# SDPA routes


def sdpa_kernel_of(op: str) -> str | None:
    """The SDPA kernel an aten op is (None: not one). The math kernel is usually no op of its own
    (it decomposes into matrix products): an SDPA call that reaches no fused kernel ran on it."""
    if not op.startswith("aten::_scaled_dot_product"):
        return None
    return next((kernel for key, kernel in (("math", "math"), ("cudnn", "cudnn"), ("efficient", "memory_efficient"),
                                            ("flash", "flash")) if key in op), "other")


class SdpaCalls(TorchFunctionMode):
    """Counts the calls of ``F.scaled_dot_product_attention`` made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


class SdpaKernels(TorchDispatchMode):
    """Counts the SDPA kernels (``sdpa_kernel_of``) the aten ops inside it reach."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kernel = sdpa_kernel_of(func._schema.name)
        if kernel is not None:
            self.kernels[kernel] += 1
        return func(*args, **(kwargs or {}))


def vtu_state(model: nn.Module) -> VTUState | None:
    """The VTU state of the decoder inside ``model`` (None: not VTU-patched, or no decoder)."""
    try:
        return getattr(find_decoder(model), "dymu_vtu", None)
    except ValueError:
        return None


@torch.no_grad()
def probe(run: Run, section: str, kind: str, call: Callable[[], Any], model: nn.Module) -> dict[str, Any]:
    """Run ``call`` once, counting its SDPA calls and the kernels they ran on (those that reached
    no fused kernel ran on the math one) and VTU's route counters over the call; added to the
    report, ``fused`` False when any call ran on the math kernel."""
    state = vtu_state(model)
    before = Counter(state.routes) if state is not None else Counter()
    with SdpaCalls() as calls, SdpaKernels() as kernels:
        call()
    counts = {kernel: kernels.kernels[kernel] for kernel in KERNELS}
    counts["math"] = calls.calls - sum(counts.values())
    record = {"section": section, "kind": kind, "sdpa_calls": calls.calls, "kernels": counts,
              "vtu_routes": dict(Counter(state.routes) - before) if state is not None else {},
              "fused": counts["math"] == 0}
    run.report.data["routes"].append(record)
    run.report.save()
    return record


# ---------------------------------------------------------------------------------------------
# Encoders


def encoder_images() -> list[Any]:
    """16 images of mixed complexity: scikit-image's photos (astronaut first) and shape images."""
    images = list(sample_photos(PHOTOS).values())
    return images + [shapes_image(n, seed=n) for n in (0, 1, 2, 4, 6, 9, 12, 24, 48, 96)]


def hf_encoder(hf_id: str, shape: dict[str, Any], device: str, dtype: torch.dtype) -> tuple[nn.Module, Callable]:
    """HF vision model ``hf_id`` (``HF_MODELS``' exact config, ``shape`` overriding) built on the
    device in dtype, random weights, and its eval transform."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    family, config, proc = HF_MODELS[hf_id]
    config = {**config, **shape}
    model_cls, config_cls = (CLIPVisionModel, CLIPVisionConfig) if family == "clip" else \
        (SiglipVisionModel, SiglipVisionConfig)
    with torch.device(device):
        model = model_cls._from_config(config_cls(**config), dtype=dtype).eval()
    return model, image_transform(**{**proc, "size": config["image_size"]})


@torch.no_grad()
def encoder_rows(run: Run, name: str, hf_id: str, target: str, batches: tuple[int, ...]) -> None:
    """Unpatched, merging off and DToMe at each batch size (see the module docstring)."""
    plan, section = run.plan, run.report.section("encoder")
    model, preprocess = hf_encoder(hf_id, plan.encoder_shape, run.device, run.dtype)
    pixels = torch.stack([preprocess(im) for im in encoder_images()]).to(run.device, run.dtype)  # (16, 3, S, S)
    cfg = model.config
    thresholds = published_72out(cfg.num_hidden_layers) if target == "published" else \
        find_thresholds(model, [pixels], target=target, name=name)
    for bs in batches:
        batch = pixels[torch.arange(bs) % len(pixels)]  # batch 1: the astronaut
        dymu_viz.patch(model, thresholds)
        counts = dymu_viz.encode(model, batch).counts.cpu()  # (bs, L + 1)
        modes = {"unpatched": Mode(lambda: dymu_viz.get_state(model) and dymu_viz.unpatch(model), lambda: model(batch)),
                 "off": Mode(lambda: dymu_viz.patch(model), lambda: model(batch)),
                 "dtome": Mode(lambda: dymu_viz.patch(model, thresholds), lambda: model(batch))}
        t = run.interleaved(modes, plan.reps, plan.warmup)
        speedup = paired(t, "unpatched", "dtome")
        bound = flop_ratio(counts, cfg.hidden_size, cfg.intermediate_size)
        row = {"model": name, "thresholds": "published 72out" if target == "published" else f"calibrated {target}",
               "batch": bs, "attention": cfg._attn_implementation, "seconds": {m: median(v) for m, v in t.items()},
               "images_per_s": {m: bs / median(v) for m, v in t.items()},
               "off_over_unpatched_time": paired(t, "off", "unpatched"),
               "dtome_speedup": speedup, "flop_bound": bound, "dtome_over_bound": speedup / bound,
               "mean_output_tokens": float(counts[:, -1].float().mean()),
               "padding_flop_share": padded_flop_overhead(counts, cfg.hidden_size, cfg.intermediate_size)}
        section["rows"].setdefault("encoder", []).append(row)
        run.report.save()
    for mode in ("unpatched", "dtome"):
        modes[mode].prepare()
        probe(run, "encoder", f"{name} {mode}, batch {batches[-1]}", modes[mode].run, model)


def encoder_section(run: Run) -> None:
    batches = run.plan.encoder_batches
    encoder_rows(run, "ViT-L-14-336", CLIP_L, "published", batches)
    encoder_rows(run, "SigLIP-SO400M-384", SO400M, "72out", batches[1:2])


# ---------------------------------------------------------------------------------------------
# Vision-language models


def build_vlm(run: Run, model_id: str) -> tuple[nn.Module, Any]:
    """``model_id``'s random build (``vlm.load_vlm``: its classes, configs and stand-in processor)
    with the plan's LLM and tower shapes, built on the device in the run's dtype."""
    plan = run.plan
    with torch.device("meta"):  # only the config, generation settings and processor are kept
        loaded = vlm.load_vlm(model_id, "random", device="meta", dtype=torch.float32,
                              vision_layers=plan.vision_layers.get(model_id))
    config = copy.deepcopy(loaded.model.config)
    config.text_config.update(plan.llms[model_id])
    config.vision_config.update(plan.towers.get(model_id, {}))
    for part in (config.text_config, config.vision_config):  # a per-layer list follows the new depth
        kinds, depth = getattr(part, "layer_types", None), getattr(part, "num_hidden_layers", None)
        if kinds and depth and len(kinds) != depth:
            part.layer_types = (list(kinds) + [kinds[-1]] * depth)[:depth]
    if hasattr(config.vision_config, "out_hidden_size"):  # Qwen2.5-VL: the PatchMerger feeds the LLM
        config.vision_config.out_hidden_size = config.text_config.hidden_size
    with torch.device(run.device):
        model = type(loaded.model)._from_config(config, dtype=run.dtype).eval()
    model.generation_config = loaded.model.generation_config
    return model, loaded.processor


def prompt_inputs(model: nn.Module, processor: Any, images: list[Any],
                  questions: list[str] | None = None) -> dict[str, Any]:
    """The processor's inputs for one prompt per image (``questions``, default "describe the
    image"), left-padded to the longest, on the model's device."""
    questions = questions or ["describe the image"] * len(images)
    return vlm.pipeline.on_device(model, vlm.prompt_inputs(processor, images, questions))


@torch.no_grad()
def vlm_rows(run: Run, section: str, label: str, model: nn.Module, inputs: dict[str, Any], dymu: Any,
             more: dict[str, tuple[Any, str]] | None = None) -> None:
    """``stage_costs`` of full, DyMU with VTU and DyMU w/o VTU (thresholds ``dymu``), and of the
    ``more`` settings (name -> (thresholds, mode)), on one prompt, the settings interleaved in every
    repetition; medians, and each setting's total time against full's as the median of
    per-repetition ratios. Then routes of one prefill per setting."""
    settings = {"full": (None, "full"), "dymu vtu": (dymu, "vtu"), "dymu compact": (dymu, "compact"), **(more or {})}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in settings}
    for rep in range(run.plan.warmup + run.plan.reps):
        for setting, (spec, mode) in settings.items():
            vlm.patch_vlm(model, spec, mode=mode)
            row = stage_costs(model, inputs, run.plan.new_tokens, warmup=0, reps=1)
            if rep >= run.plan.warmup:
                runs[setting].append(row)
    rows = run.report.section(section)["rows"].setdefault("vlm", [])
    for setting, done in runs.items():
        row = dict(done[-1], sample=label, setting=setting)
        row.update({key: median([r[key] for r in done]) for key in
                    ("vision_s", "prefill_s", "decode_s", "decode_s_per_token", "total_s")})
        row["total_over_full"] = median([r["total_s"] / f["total_s"] for r, f in zip(done, runs["full"])])
        rows.append(row)
    run.report.save()
    for setting, (spec, mode) in settings.items():
        vlm.patch_vlm(model, spec, mode=mode)
        probe(run, section, f"{label} {setting}: prefill (tower + LLM)", partial(model, **inputs, use_cache=False),
              model)


@torch.no_grad()
def llm_prefill_rows(run: Run, lm: nn.Module, full_embeds: Tensor) -> None:
    """``vlm.py``'s prefill rows at batch 1 on LLaVA's language model: every mode of
    ``vlm.MODES`` interleaved per level, KV bytes after prefill and peak memory growth."""
    plan, virtual = run.plan, full_embeds.shape[1]
    rows = run.report.section("llava")["rows"].setdefault("llm_prefill", [])
    for n in llm_bench.LEVELS:
        inputs = {mode: llm_bench.inputs_for(mode, n, full_embeds) for mode in llm_bench.MODES}
        kv: dict[str, int] = {}
        peak: dict[str, int | None] = {}

        def mode_of(mode: str) -> Mode:
            """One prefill in ``mode`` on a fresh cache; its KV bytes and peak memory growth after it."""
            held: dict[str, Any] = {}

            def prepare() -> None:
                llm_bench.use_mode(lm, mode)
                embeds, layout = inputs[mode]
                if layout is not None:
                    lm.dymu_vtu.start(layout, embeds.shape[1])
                held.update(cache=DynamicCache(), start=run.peak_start())

            def after() -> None:
                kv[mode], peak[mode] = cache_bytes(held["cache"]), run.peak_growth(held["start"])
            return Mode(prepare, lambda: lm(inputs_embeds=inputs[mode][0], past_key_values=held["cache"],
                                            use_cache=True), after)

        t = run.interleaved({mode: mode_of(mode) for mode in llm_bench.MODES}, plan.reps, plan.warmup)
        rows.append({**llm_bench.prefill_row(lm.config, n, virtual, t, kv), "peak_growth_bytes": peak})
        run.report.save()
        if n in (576, 394):  # nothing merged and merged: the VTU routes differ
            for mode in llm_bench.DECODE_MODES:
                once = mode_of(mode)
                once.prepare()
                probe(run, "llava", f"LLM prefill {mode}, {n} image tokens, batch 1", once.run, lm)
    llm_bench.use_mode(lm, "full")


@torch.no_grad()
def llm_decode_rows(run: Run, lm: nn.Module, full_embeds: Tensor) -> None:
    """``vlm.py``'s decode rows: per batch and level, every mode prefilled on its own decoder (the
    VTU ones share ``lm``'s weights) and cache, then the modes' single-token steps interleaved
    step by step; a step ratio is the median of step-to-step ratios. Warm-up repetitions run 4
    steps. Routes of one more step per mode at batch 1 (merged, and nothing merged)."""
    plan = run.plan
    decoders = llm_bench.decoders_for(lm)
    rows = run.report.section("llava")["rows"].setdefault("llm_decode", [])
    for batch in plan.decode_batches:
        embeds = full_embeds.expand(batch, -1, -1).contiguous()
        for n in llm_bench.LEVELS:
            inputs = {mode: llm_bench.inputs_for(mode, n, embeds) for mode in llm_bench.DECODE_MODES}
            for _ in range(plan.warmup):
                llm_bench.decode_pass(decoders, inputs, min(4, plan.decode_steps), run.clock)
            passes = [llm_bench.decode_pass(decoders, inputs, plan.decode_steps, run.clock)
                      for _ in range(plan.decode_reps)]
            rows.append(llm_bench.decode_row(batch, n, [seconds for seconds, _ in passes]))
            run.report.save()
            if batch == plan.decode_batches[0] and n in (576, 394):
                caches = passes[-1][1]
                for mode, decoder in decoders.items():
                    step = partial(decoder, inputs_embeds=inputs[mode][0][:, -1:], past_key_values=caches[mode],
                                   use_cache=True)
                    probe(run, "llava", f"LLM decode step {mode}, {n} image tokens, batch {batch}", step, decoder)
            del passes


def llava_section(run: Run) -> None:
    model, processor = build_vlm(run, LLAVA)
    lm = model.model.language_model  # LlamaModel: vlm.py's decoder at the real shape
    torch.manual_seed(0)
    full_embeds = torch.randn(1, llm_bench.BEFORE + llm_bench.IMAGE + llm_bench.AFTER, lm.config.hidden_size,
                              device=run.device, dtype=run.dtype)
    llm_prefill_rows(run, lm, full_embeds)
    photos = sample_photos(["chelsea", "rocket"])
    published = published_72out(model.config.vision_config.num_hidden_layers)
    vlm_rows(run, "llava", "LLaVA-1.5-7B, chelsea", model, prompt_inputs(model, processor, [photos["chelsea"]]),
             published)
    two = prompt_inputs(model, processor, list(photos.values()),  # prompts of two lengths: padded rows
                        ["describe the image", "what is the large white object in the middle of this photo"])
    vlm.patch_vlm(model, published, mode="vtu")
    probe(run, "llava", "LLaVA-1.5-7B dymu vtu: prefill of 2 photos (padded rows)",
          partial(model, **two, use_cache=False), model)
    vlm.unpatch_vlm(model)
    llm_decode_rows(run, lm, full_embeds)


def onevision_section(run: Run) -> None:
    model, processor = build_vlm(run, ONEVISION)
    tower = model.model.vision_tower
    crops = [processor.image_processor(images=[im], return_tensors="pt")["pixel_values"][0].to(run.device, run.dtype)
             for im in calibration_photos(CALIBRATION).values()]  # (crops, 3, 384, 384) each
    thresholds = find_thresholds(tower, crops, target="72out", name="SigLIP-SO400M-384 (OneVision tower)")
    side = run.plan.onevision_side
    image = resized(sample_photos(["astronaut"])["astronaut"], side)
    vlm_rows(run, "onevision", f"LLaVA-OneVision-7B, astronaut at {side} px (AnyRes)", model,
             prompt_inputs(model, processor, [image]), thresholds)


def qwen_section(run: Run) -> None:
    model, processor = build_vlm(run, QWEN)
    side = run.plan.qwen_side
    calibration = [resized(im, side) for im in calibration_photos(CALIBRATION).values()]
    thresholds = vlm.qwen.calibrate_rounds(model, processor, calibration, keep=0.3, rounds=4, progress=False)
    in_tower = vlm.qwen.calibrate_rounds(model, processor, calibration, keep=0.3, rounds=2, tower_keep=0.5,
                                         progress=False)
    image = resized(sample_photos(["chelsea"])["chelsea"], side)
    vlm_rows(run, "qwen", f"Qwen2.5-VL-7B, chelsea at {side} px", model, prompt_inputs(model, processor, [image]),
             thresholds, {"dymu in tower vtu": (in_tower, "vtu")})


SECTION_RUNS: dict[str, Callable[[Run], None]] = {
    "encoder": encoder_section, "llava": llava_section, "onevision": onevision_section, "qwen": qwen_section}


# ---------------------------------------------------------------------------------------------
# Report


def machine(device: str) -> dict[str, Any]:
    """The device and host, in words and numbers."""
    info: dict[str, Any] = {"device_type": "cuda" if device.startswith("cuda") else "cpu",
                            "host_cpu": platform.processor() or platform.machine(),
                            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    if info["device_type"] == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, memory_gib=props.total_memory / 2 ** 30,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    sdpa_enabled={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                  "memory_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                  "math": torch.backends.cuda.math_sdp_enabled()})
    else:
        info["device"] = "cpu"
    return info


def versions(commit: str | None = None) -> dict[str, Any]:
    """Python, torch, transformers, dymu_viz and this tree's commit (``commit``, else git's answer:
    a copied tree may come without its history); the transformers check."""
    import transformers

    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                          timeout=10, check=False).stdout.strip() or None
    except OSError:
        commit = None
    try:
        check_transformers()
        refused = None
    except RuntimeError as err:
        refused = str(err)
    minor = ".".join(transformers.__version__.split(".")[:2])
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "dymu_viz": dymu_viz.__version__, "commit": commit,
            "transformers_check": {"tested": minor in TESTED_TRANSFORMERS,
                                   "override": os.environ.get(UNTESTED_OK) == "1", "refusal": refused}}


class Report:
    """The run's JSON and markdown in ``out``, rewritten whole (atomically) by ``save``."""

    def __init__(self, out: Path, data: dict[str, Any]):
        self.out, self.data = out, data
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"][name]

    def save(self) -> None:
        for name, text in (("gpu.json", json.dumps(self.data, indent=1) + "\n"), ("gpu.md", markdown(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)


def encoder_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | thresholds | batch | unpatched im/s | off / unpatched time | DToMe speed-up | FLOP bound "
             "| DToMe / bound | padding FLOPs | mean tokens |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['thresholds']} | {r['batch']} | {r['images_per_s']['unpatched']:.1f} "
              f"| {r['off_over_unpatched_time']:.3f} | {r['dtome_speedup']:.2f}x | {r['flop_bound']:.2f}x "
              f"| **{r['dtome_over_bound']:.2f}** | {100 * r['padding_flop_share']:.1f} % "
              f"| {r['mean_output_tokens']:.1f} |"
              for r in rows]
    return lines


def vlm_table(rows: list[dict[str, Any]]) -> list[str]:
    """``vlm.costs.cost_table`` and each setting's total time over full's (paired)."""
    ratios = ", ".join(f"{r['setting']} {r['total_over_full']:.2f}" for r in rows)
    return [*cost_table(rows).splitlines(), "", f"Total time / full (median of paired ratios): {ratios}"]


def routes_table(routes: list[dict[str, Any]]) -> list[str]:
    lines = ["| section | call | SDPA calls | flash | memory-efficient | cuDNN | math | other | VTU routes | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in routes:
        k = r["kernels"]
        vtu_routes = ", ".join(f"{name} {n}" for name, n in sorted(r["vtu_routes"].items())) or "-"
        lines.append(f"| {r['section']} | {r['kind']} | {r['sdpa_calls']} | {k['flash']} | {k['memory_efficient']} "
                     f"| {k['cudnn']} | {k['math']} | {k['other']} | {vtu_routes} "
                     f"| {'fused' if r['fused'] else '**MATH: FAILED**'} |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The report as markdown: a header on the run, then every section's tables and the routes."""
    m, v, s = data["machine"], data["versions"], data["settings"]
    check = v["transformers_check"]
    release = "a tested release" if check["tested"] else \
        f"UNTESTED, run with {UNTESTED_OK}=1" if check["override"] else "untested: the VLM path refuses it"
    lines = [f"# GPU kit: {m['device']} ({s['dtype']}{', SMOKE: tiny shapes' if data['smoke'] else ''})", "",
             f"Started {data['started']}, finished {data['finished'] or 'not yet'}; status: **{data['status']}**. "
             f"torch {v['torch']} (CUDA {m.get('cuda', '-')}), transformers {v['transformers']} ({release}), "
             f"Python {v['python']}, dymu_viz {v['dymu_viz']} at {v['commit'] or 'an unknown commit'}; "
             f"repetitions {s['reps']} after {s['warmup']} warm-up, decode {s['decode_steps']} steps.", ""]
    titles = {"encoder": "Encoders", "llm_prefill": "LLaVA-1.5-7B language model: prefill, batch 1",
              "llm_decode": f"LLaVA-1.5-7B language model: decode ({s['decode_steps']} steps after the prefill), "
                            "time ratios to the full model", "vlm": "Whole model (tower included), batch 1"}
    tables = {"encoder": encoder_table, "llm_prefill": partial(llm_bench.prefill_table, peak_key="peak_growth_bytes"),
              "llm_decode": llm_bench.decode_table, "vlm": vlm_table}
    for name, section in data["sections"].items():
        took = f" ({section['seconds']:.0f} s)" if section["seconds"] else ""
        lines += [f"## {name}: {section['status']}{took}", ""]
        if section["error"]:
            lines += ["```", section["error"].rstrip(), "```", ""]
        for table, rows in section["rows"].items():
            lines += [f"{titles[table]}:", "", *tables[table](rows), ""]
    lines += ["## SDPA routes", "", *routes_table(data["routes"]), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and a few steps (a CPU does it in seconds)")
    p.add_argument("--only", action="append", choices=SECTIONS, help="run this section only (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--reps", type=int, help="timed repetitions (default: the plan's)")
    p.add_argument("--decode-steps", type=int, help="decode steps after each prefill (default: the plan's)")
    p.add_argument("--commit", help="the tree's commit, recorded in the report where the copy has no git history")
    args = p.parse_args(argv)
    overrides = {"reps": args.reps, "decode_steps": args.decode_steps}
    plan = dataclasses.replace(SMOKE if args.smoke else FULL, **{k: v for k, v in overrides.items() if v is not None})
    sections = [s for s in SECTIONS if s in (args.only or SECTIONS)]
    data = {"kit": "benchmarks/gpu.py", "smoke": args.smoke, "argv": sys.argv[1:] if argv is None else argv,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "finished": None, "status": "running",
            "machine": machine(args.device), "versions": versions(args.commit),
            "settings": {"device": args.device, "dtype": args.dtype, "reps": plan.reps, "warmup": plan.warmup,
                         "decode_steps": plan.decode_steps, "decode_reps": plan.decode_reps,
                         "new_tokens": plan.new_tokens, "plan": asdict(plan)},
            "sections": {s: {"status": "pending", "seconds": None, "error": None, "rows": {}} for s in sections},
            "routes": [], "routes_fused": None, "open_clip_imported": None, "failures": []}
    run = Run(plan, args.device, DTYPES[args.dtype], Report(args.out, data))
    run.report.save()
    for name in sections:
        section = data["sections"][name]
        section["status"], start = "running", time.perf_counter()
        run.report.save()
        torch.manual_seed(0)
        try:
            SECTION_RUNS[name](run)
            section["status"] = "done"
        except Exception:  # noqa: BLE001 (the next section still runs; the traceback goes into the report)
            section["status"], section["error"] = "failed", traceback.format_exc()
            data["failures"].append(f"section {name} failed")
            print(section["error"], file=sys.stderr, flush=True)
        section["seconds"] = time.perf_counter() - start
        gc.collect()
        if run.cuda:
            torch.cuda.empty_cache()
        run.report.save()
        print(f"{name}: {section['status']} in {section['seconds']:.1f} s", flush=True)
    math = [r["kind"] for r in data["routes"] if not r["fused"]]
    data["failures"] += [f"SDPA on the math kernel: {kind}" for kind in math]
    data.update(routes_fused=not math, open_clip_imported=sys.modules.get("open_clip") is not None,
                finished=time.strftime("%Y-%m-%d %H:%M:%S"), status="failed" if data["failures"] else "ok")
    run.report.save()
    print(f"{data['status']}: {args.out / 'gpu.json'}, {args.out / 'gpu.md'}" +
          "".join(f"\n  {f}" for f in data["failures"]), flush=True)
    return 1 if data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
