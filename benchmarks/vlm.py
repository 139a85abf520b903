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

with the FLOP-ratio bound (projections and MLP on compact tokens, attention on the virtual
length) and the KV-cache bytes after prefill. Targets: VTU time / full time <= 1.1 x the FLOP
ratio; KV bytes ratio = compact / virtual. Peak memory is measured on GPU only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from encoder import write_readme_table  # noqa: E402

from dymu_viz.vtu import VirtualLayout, cache_bytes, patch_llm, unpatch_llm  # noqa: E402

SHAPES = {
    "cpu": dict(hidden_size=1024, intermediate_size=2752, num_attention_heads=16, num_key_value_heads=16,
                num_hidden_layers=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               num_hidden_layers=32, vocab_size=32000),
}
BEFORE, IMAGE, AFTER = 40, 576, 20
LEVELS = (576, 394, 195, 89)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def prefill_flops(n_compact: int, n_virtual: int, cfg: LlamaConfig) -> float:
    """Decoder prefill FLOPs: projections / MLP on n_compact rows, attention on n_virtual."""
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    linear = 2 * n_compact * (2 * d * d + 2 * d * kv + 3 * d * cfg.intermediate_size)
    attention = 2 * 2 * n_virtual * n_virtual * d
    return cfg.num_hidden_layers * (linear + attention)


def mapping(n_image: int, seed: int = 0) -> torch.Tensor:
    """Virtual position -> compact index for text, an image of IMAGE positions merged to
    n_image tokens, text."""
    g = torch.Generator().manual_seed(seed)
    image = torch.cat([torch.arange(n_image), torch.randint(0, n_image, (IMAGE - n_image,), generator=g)])
    image = image[torch.randperm(IMAGE, generator=g)]
    return torch.cat([torch.arange(BEFORE), BEFORE + image, torch.arange(BEFORE + n_image, BEFORE + n_image + AFTER)])


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=list(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[args.shape])
    cfg._attn_implementation = "sdpa"
    model = LlamaModel(cfg).to(args.device, DTYPES[args.dtype]).eval()
    dim, virtual = cfg.hidden_size, BEFORE + IMAGE + AFTER
    full_embeds = torch.randn(1, virtual, dim, device=args.device, dtype=DTYPES[args.dtype])
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(embeds: torch.Tensor, layout: VirtualLayout | None) -> tuple[float, int, int]:
        if layout is not None:
            model.dymu_vtu.start(layout, embeds.shape[1])
        cache = DynamicCache()
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        sync()
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else 0
        return time.perf_counter() - start, cache_bytes(cache), peak

    rows = []
    for n in LEVELS:
        m = mapping(n).to(args.device)
        compact = full_embeds[:, :BEFORE + n + AFTER]
        layout = VirtualLayout.from_mappings([m])
        times: dict[str, list[float]] = {"full": [], "vtu": [], "compact": []}
        kv, peak = {}, {}
        for rep in range(args.warmup + args.reps):
            for mode in times:
                if mode == "vtu":
                    patch_llm(model)
                elif getattr(model, "dymu_vtu", None) is not None:
                    unpatch_llm(model)
                t, kv[mode], peak[mode] = run(full_embeds if mode == "full" else compact, layout if mode == "vtu" else None)
                if rep >= args.warmup:
                    times[mode].append(t)
        med = {k: statistics.median(v) for k, v in times.items()}
        bound = prefill_flops(BEFORE + n + AFTER, virtual, cfg) / prefill_flops(virtual, virtual, cfg)
        row = {"image_tokens": n, "compact": BEFORE + n + AFTER, "virtual": virtual, "seconds": med,
               "vtu_time_ratio": med["vtu"] / med["full"], "vtu_flop_ratio": bound,
               "vtu_over_bound": med["vtu"] / med["full"] / bound,
               "compact_time_ratio": med["compact"] / med["full"], "kv_bytes": kv,
               "kv_ratio_vtu": kv["vtu"] / kv["full"], "expected_kv_ratio": (BEFORE + n + AFTER) / virtual,
               "peak_bytes": peak}
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    shape = SHAPES[args.shape]
    out = Path(__file__).resolve().parent / "results" / f"vlm_{'cpu' if device == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": device, "dtype": args.dtype, "shape": shape, "rows": rows}, indent=1) + "\n")
    lines = [f"Decoder {shape['num_hidden_layers']} layers x {shape['hidden_size']} (MLP {shape['intermediate_size']}, "
             f"{shape['num_attention_heads']} heads), {device}/{args.dtype}, sequence {BEFORE}+{IMAGE}+{AFTER}.", "",
             "| image tokens | compact / virtual | full prefill s | VTU / full time | FLOP ratio | VTU / bound "
             "| w/o VTU / full time | KV bytes VTU / full | expected |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['image_tokens']} | {r['compact']} / {r['virtual']} | {r['seconds']['full']:.3f} "
                     f"| {r['vtu_time_ratio']:.3f} | {r['vtu_flop_ratio']:.3f} | {r['vtu_over_bound']:.2f} "
                     f"| {r['compact_time_ratio']:.3f} | {r['kv_ratio_vtu']:.3f} | {r['expected_kv_ratio']:.3f} |")
    text = "\n".join(lines)
    write_readme_table(f"vlm:{'cpu' if device == 'cpu' else 'gpu'}", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
