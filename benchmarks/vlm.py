"""LLM prefill with DyMU: full length vs VTU vs w/o VTU, on a LLaVA-1.5-shaped decoder.

    python benchmarks/vlm.py                   # CPU: a scaled-down Llama (see SHAPES["cpu"])
    python benchmarks/vlm.py --shape 7b --device cuda --dtype float16

The sequence is LLaVA-1.5's: 40 text tokens, 576 image positions, 20 text tokens. The image is
merged to the paper's mean token counts (high 394, mid 195, low 89; plus 576 = no merge) with a
random surjection (the timing depends on the counts, not on which patches merge). Per merge
level, in one run with interleaved repetitions and medians:

* full: the unpatched decoder on all 636 positions;
* VTU: the VTU-patched decoder on the compact sequence (virtual length 636);
* w/o VTU: the unpatched decoder on the compact sequence at consecutive positions;
* FLOP-equivalent: the unpatched decoder on the compact sequence whose attention runs SDPA over
  fixed tensors of the virtual length (no expansion, no virtual RoPE, no averaging): exactly
  VTU's FLOP mix with none of its bookkeeping, i.e. what that mix costs on this hardware;

with the FLOP-ratio bound (projections and MLP on compact tokens, attention on the virtual
length) and the KV-cache bytes after prefill. Time ratios are medians of per-repetition
ratios. Targets: VTU time / full time <= 1.1 x the FLOP ratio; KV bytes ratio = compact / virtual.
VTU / FLOP-equivalent is VTU's own overhead; FLOP-equivalent / bound is what the hardware adds
(matrix products over fewer rows run at a lower rate per row, notably on CPU).

Then ``--decode`` single-token steps after a prefill, at batch 1 and 8 (``--batch-sizes``), for
full (full-length cache), VTU with its two cache policies ("compact": compact un-rotated keys
re-expanded and re-rotated every step; "decode_fast": keys expanded and rotated once, compact
values) and w/o VTU (compact cache). Each mode has its own decoder (the VTU ones share the
unpatched decoder's weights) and cache, so their steps run interleaved, step by step: a step
ratio is the median over the steps of step-to-step ratios (the median over repetitions of that),
which cancels the machine's drifts and hiccups. The end-to-end figure is prefill + the sum of
all decode steps, the time a user waits for an answer of ``--decode`` tokens.

Peak memory of one prefill: on GPU, torch's peak allocated bytes; on CPU (``--memory``), the
growth of the resident set's peak during one prefill (Linux VmHWM, reset just before it), each
mode and level in a fresh child process with a fixed malloc mmap threshold so that freed tensors
leave the resident set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, paired, parser, publish  # noqa: E402

from dymu_viz.vlm.costs import Clock, llm_prefill_flops  # noqa: E402
from dymu_viz.vtu import VirtualLayout, cache_bytes, patch_llm, unpatch_llm  # noqa: E402

SHAPES = {
    "cpu": dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=16, num_key_value_heads=16,
                num_hidden_layers=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               num_hidden_layers=32, vocab_size=32000),
}
BEFORE, IMAGE, AFTER = 40, 576, 20
LEVELS = (576, 394, 195, 89)
MODES = ("full", "vtu", "vtu_fast", "compact", "flop_equivalent")
DECODE_MODES = ("full", "vtu", "vtu_fast", "compact")  # full first: the ratios' denominator
FLOP_EQUIVALENT = "dymu_flop_equivalent"


def mapping(n_image: int, seed: int = 0) -> torch.Tensor:
    """Virtual position -> compact index for text, an image of IMAGE positions merged to
    n_image tokens (a random surjection; with nothing merged, every patch its own token in
    order, as DyMU leaves it), text."""
    g = torch.Generator().manual_seed(seed)
    image = torch.cat([torch.arange(n_image), torch.randint(0, n_image, (IMAGE - n_image,), generator=g)])
    if n_image < IMAGE:
        image = image[torch.randperm(IMAGE, generator=g)]
    return torch.cat([torch.arange(BEFORE), BEFORE + image, torch.arange(BEFORE + n_image, BEFORE + n_image + AFTER)])


def build(shape: str, device: str, dtype: torch.dtype) -> tuple[LlamaModel, torch.Tensor]:
    """The decoder (seeded random init) and full-length input embeddings (1, virtual, D)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    model = LlamaModel(cfg).to(device, dtype).eval()
    return model, torch.randn(1, BEFORE + IMAGE + AFTER, cfg.hidden_size, device=device, dtype=dtype)


def flop_equivalent_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              **kwargs: object) -> tuple[torch.Tensor, None]:
    """VTU's attention FLOPs without its work: causal SDPA over fixed (B, H, virtual, D) tensors
    laid out as VTU's expansions are, then the first q_len rows in HF's (B, q_len, H, D) layout."""
    B, H, q_len, D = query.shape
    shape = (B, BEFORE + IMAGE + AFTER, H, D)
    fixed = getattr(module, "flop_equivalent_qkv", None)
    if fixed is None or fixed[0].shape != shape or fixed[0].dtype != query.dtype:
        fixed = module.flop_equivalent_qkv = [torch.randn(shape, device=query.device, dtype=query.dtype) for _ in "qkv"]
    q, k, v = (t.transpose(1, 2) for t in fixed)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return out.transpose(1, 2)[:, :q_len], None


def shared_copy(model: LlamaModel) -> LlamaModel:
    """A second decoder of model's architecture and config holding the very same weight and
    buffer tensors (no copy), so that it can be patched on its own."""
    with torch.device("meta"):
        twin = LlamaModel(copy.deepcopy(model.config))
    twin.load_state_dict(model.state_dict(), assign=True)
    for name, buffer in model.named_buffers():  # the non-persistent ones (RoPE's inv_freq) too
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner), attr, buffer)
    return twin.eval()


def use_mode(model: LlamaModel, mode: str) -> None:
    """Patch / unpatch model for mode (see MODES)."""
    if mode in ("vtu", "vtu_fast"):
        patch_llm(model, cache="decode_fast" if mode == "vtu_fast" else "compact")
        return
    if getattr(model, "dymu_vtu", None) is not None:
        unpatch_llm(model)
    AttentionInterface.register(FLOP_EQUIVALENT, flop_equivalent_attention)
    model.config._attn_implementation = FLOP_EQUIVALENT if mode == "flop_equivalent" else "sdpa"


def inputs_for(mode: str, n: int, full_embeds: torch.Tensor) -> tuple[torch.Tensor, VirtualLayout | None]:
    """The prefill input of a mode at merge level n (every row of the batch alike): embeddings
    and, for VTU, the layout."""
    if mode == "full":
        return full_embeds, None
    rows = full_embeds.shape[0]
    layout = VirtualLayout.from_mappings([mapping(n).to(full_embeds.device)] * rows) if mode.startswith("vtu") else None
    return full_embeds[:, :BEFORE + n + AFTER], layout


def prefill_row(cfg: LlamaConfig, n: int, virtual: int, times: dict[str, list[float]],
                kv: dict[str, int]) -> dict[str, object]:
    """The prefill row of level ``n``: median seconds and paired time ratios of every mode of
    ``MODES``, the FLOP-ratio bound, KV bytes against their expected ratios."""
    compact = BEFORE + n + AFTER
    bound = llm_prefill_flops(cfg, compact, virtual) / llm_prefill_flops(cfg, virtual, virtual)
    return {"image_tokens": n, "compact": compact, "virtual": virtual,
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "vtu_time_ratio": paired(times, "vtu", "full"), "vtu_fast_time_ratio": paired(times, "vtu_fast", "full"),
            "vtu_flop_ratio": bound, "vtu_over_bound": paired(times, "vtu", "full") / bound,
            "compact_time_ratio": paired(times, "compact", "full"),
            "flop_equivalent_time_ratio": paired(times, "flop_equivalent", "full"),
            "vtu_over_flop_equivalent": paired(times, "vtu", "flop_equivalent"), "kv_bytes": kv,
            "kv_ratio_vtu": kv["vtu"] / kv["full"], "kv_ratio_vtu_fast": kv["vtu_fast"] / kv["full"],
            "expected_kv_ratio": compact / virtual, "expected_kv_ratio_fast": (virtual + compact) / (2 * virtual)}


def decoders_for(model: LlamaModel) -> dict[str, LlamaModel]:
    """One decoder per mode of ``DECODE_MODES``: full and w/o VTU the unpatched ``model``, the VTU
    modes copies sharing its weights (``shared_copy``), each patched with its cache policy."""
    use_mode(model, "full")
    decoders = {"full": model, "vtu": shared_copy(model), "vtu_fast": shared_copy(model), "compact": model}
    patch_llm(decoders["vtu"], cache="compact")
    patch_llm(decoders["vtu_fast"], cache="decode_fast")
    return decoders


def decode_pass(decoders: dict[str, LlamaModel], inputs: dict[str, tuple[torch.Tensor, VirtualLayout | None]],
                steps: int, clock: Clock) -> tuple[dict[str, list[float]], dict[str, DynamicCache]]:
    """Every mode's prefill on a fresh cache, then ``steps`` single-token steps (the prompt's last
    embedding again), the modes' steps interleaved so that each pairs with the others' at the same
    length. Seconds per mode, [prefill, step 1, ...], and the caches."""
    caches: dict[str, DynamicCache] = {}
    marks: dict[str, list[tuple[object, object]]] = {m: [] for m in decoders}
    for mode, decoder in decoders.items():
        (embeds, layout), caches[mode] = inputs[mode], DynamicCache()
        if layout is not None:
            decoder.dymu_vtu.start(layout, embeds.shape[1])
        start = clock.mark()
        decoder(inputs_embeds=embeds, past_key_values=caches[mode], use_cache=True)
        marks[mode].append((start, clock.mark()))
    for _ in range(steps):
        for mode, decoder in decoders.items():
            start = clock.mark()
            decoder(inputs_embeds=inputs[mode][0][:, -1:], past_key_values=caches[mode], use_cache=True)
            marks[mode].append((start, clock.mark()))
    return {m: [clock.seconds(a, b) for a, b in v] for m, v in marks.items()}, caches


def decode_row(batch: int, n: int, passes: list[dict[str, list[float]]]) -> dict[str, object]:
    """The decode row of one batch size and level from timed ``decode_pass``es: per mode the median
    step, the step ratio to full (per pass the median of step-to-step ratios), and end to end
    (prefill + every step) with its paired ratio."""
    modes = list(passes[0])
    step_ratio = {m: [statistics.median(a / b for a, b in zip(p[m][1:], p["full"][1:])) for p in passes]
                  for m in modes[1:]}
    total = {m: [sum(p[m]) for p in passes] for m in modes}
    return {"batch": batch, "image_tokens": n, "decode_steps": len(passes[0]["full"]) - 1,
            "step_seconds": {m: statistics.median(statistics.median(p[m][1:]) for p in passes) for m in modes},
            "step_ratio": {m: statistics.median(v) for m, v in step_ratio.items()},
            "end_to_end_seconds": {m: statistics.median(v) for m, v in total.items()},
            "end_to_end_ratio": {m: paired(total, m, "full") for m in modes[1:]}}


def mib(value: int | None) -> str:
    """Bytes as MiB for a table ("-": not measured)."""
    return "-" if not value else f"{value / 2 ** 20:.1f}"


def prefill_table(rows: list[dict], peak_key: str) -> list[str]:
    """The prefill rows as a markdown table, peak memory per mode from ``row[peak_key]``."""
    lines = ["| image tokens | compact / virtual | full prefill ms | VTU / full | decode-fast VTU / full | FLOP ratio "
             "| VTU / bound | FLOP-equivalent / bound | VTU / FLOP-equivalent | w/o VTU / full "
             "| KV VTU / full (expected) | KV decode-fast / full (expected) | peak MiB full / VTU / w/o VTU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r[peak_key]
        lines.append(f"| {r['image_tokens']} | {r['compact']} / {r['virtual']} | {1e3 * r['seconds']['full']:.2f} "
                     f"| {r['vtu_time_ratio']:.3f} | {r['vtu_fast_time_ratio']:.3f} | {r['vtu_flop_ratio']:.3f} "
                     f"| {r['vtu_over_bound']:.2f} | {r['flop_equivalent_time_ratio'] / r['vtu_flop_ratio']:.2f} "
                     f"| {r['vtu_over_flop_equivalent']:.2f} | {r['compact_time_ratio']:.3f} "
                     f"| {r['kv_ratio_vtu']:.3f} ({r['expected_kv_ratio']:.3f}) "
                     f"| {r['kv_ratio_vtu_fast']:.3f} ({r['expected_kv_ratio_fast']:.3f}) "
                     f"| {' / '.join(mib(peak[m]) for m in ('full', 'vtu', 'compact'))} |")
    return lines


def decode_table(rows: list[dict]) -> list[str]:
    """The decode rows as a markdown table (decode-fast VTU's step ratio in bold: its target)."""
    lines = ["| batch | image tokens | full step ms | step: VTU compact cache | VTU decode-fast | w/o VTU "
             "| end to end: VTU compact cache | VTU decode-fast | w/o VTU | full end to end s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        st, e2e = r["step_ratio"], r["end_to_end_ratio"]
        lines.append(f"| {r['batch']} | {r['image_tokens']} | {1e3 * r['step_seconds']['full']:.2f} | {st['vtu']:.2f} "
                     f"| **{st['vtu_fast']:.2f}** | {st['compact']:.2f} | {e2e['vtu']:.2f} | {e2e['vtu_fast']:.2f} "
                     f"| {e2e['compact']:.2f} | {r['end_to_end_seconds']['full']:.3f} |")
    return lines


def proc_status_bytes(key: str) -> int:
    """A memory line of /proc/self/status ("VmRSS", "VmHWM") in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@torch.no_grad()
def child_memory(shape: str, mode: str, n: int) -> int:
    """In a fresh process: peak RSS growth (bytes) over one CPU float32 prefill. The peak (VmHWM)
    is reset to the current RSS just before the prefill; the parent sets a fixed malloc mmap
    threshold so that freed tensors leave the RSS and it follows what is allocated."""
    model, full_embeds = build(shape, "cpu", torch.float32)
    embeds, layout = inputs_for(mode, n, full_embeds)
    use_mode(model, mode)
    if layout is not None:
        model.dymu_vtu.start(layout, embeds.shape[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    baseline = proc_status_bytes("VmRSS")
    model(inputs_embeds=embeds, past_key_values=DynamicCache(), use_cache=True)
    return proc_status_bytes("VmHWM") - baseline


def cpu_memory(shape: str, n: int) -> dict[str, int]:
    """child_memory of every mode at level n, each in its own process."""
    peaks = {}
    for mode in ("full", "vtu", "compact"):  # prefill memory: both VTU policies expand alike
        out = subprocess.run([sys.executable, __file__, "--child-memory", shape, mode, str(n)], check=True,
                             capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        peaks[mode] = int(out.stdout.strip().splitlines()[-1])
    return peaks


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, reps=5, dtype=True)
    p.add_argument("--shape", default="cpu", choices=list(SHAPES))
    p.add_argument("--decode", type=int, default=128, help="decode steps timed after each prefill (0: none)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="batch sizes of the decode rows")
    p.add_argument("--memory", action="store_true", help="CPU: also measure peak RSS growth per prefill (child processes)")
    p.add_argument("--child-memory", nargs=3, metavar=("SHAPE", "MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_memory:
        print(child_memory(args.child_memory[0], args.child_memory[1], int(args.child_memory[2])))
        return 0
    model, full_embeds = build(args.shape, args.device, DTYPES[args.dtype])
    cfg, virtual = model.config, full_embeds.shape[1]
    clock = Clock(torch.device(args.device))

    def prefill(decoder: LlamaModel, embeds: torch.Tensor, layout: VirtualLayout | None) -> tuple[float, DynamicCache, int]:
        """Seconds of one prefill of decoder (its VTU layout set first), its cache, peak memory."""
        if layout is not None:
            decoder.dymu_vtu.start(layout, embeds.shape[1])
        cache = DynamicCache()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = clock.mark()
        decoder(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        seconds = clock.seconds(start, clock.mark())
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
        return seconds, cache, peak

    rows = []
    for n in LEVELS:  # prefill, batch 1
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        kv, peak = {}, {}
        for rep in range(args.warmup + args.reps):
            for mode in times:
                use_mode(model, mode)
                t, cache, peak[mode] = prefill(model, *inputs_for(mode, n, full_embeds))
                kv[mode] = cache_bytes(cache)
                if rep >= args.warmup:
                    times[mode].append(t)
        if args.memory and args.device == "cpu":
            peak = cpu_memory(args.shape, n)
        row = {**prefill_row(cfg, n, virtual, times, kv), "peak_bytes": peak}
        rows.append(row)
        print(json.dumps(row), flush=True)

    decode_rows = []
    decoders = decoders_for(model)
    for batch in args.batch_sizes if args.decode else []:
        embeds_b = full_embeds.expand(batch, -1, -1).contiguous()
        for n in LEVELS:
            inputs = {mode: inputs_for(mode, n, embeds_b) for mode in DECODE_MODES}
            passes = [decode_pass(decoders, inputs, args.decode, clock)[0] for _ in range(args.warmup + args.reps)]
            row = decode_row(batch, n, passes[args.warmup:])
            decode_rows.append(row)
            print(json.dumps(row), flush=True)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    shape = SHAPES[args.shape]
    lines = [f"Decoder {shape['num_hidden_layers']} layers x {shape['hidden_size']} (MLP {shape['intermediate_size']}, "
             f"{shape['num_attention_heads']} heads), {device}/{args.dtype}, sequence {BEFORE}+{IMAGE}+{AFTER}.", "",
             "Prefill, batch 1:", "", *prefill_table(rows, "peak_bytes")]
    if decode_rows:
        lines += ["", f"Decode ({args.decode} steps after the prefill), time ratios to the full model:", "",
                  *decode_table(decode_rows)]
    publish("vlm", args.device, {"device": device, "dtype": args.dtype, "shape": shape, "rows": rows,
                                 "decode_rows": decode_rows}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
