"""Where a VLM's time goes, stage by stage, for one sample at a time.

Stages of ``model.generate`` on one prompt:

* vision: the first forward minus its LLM call (tower, merging or pooling, splicing);
* prefill: the LLM in the first forward;
* decode: every later forward (one new token each).

Wall time comes from CUDA events on a GPU and ``perf_counter`` on a CPU, with warm-up runs
first. FLOPs by stage are computed from the counts the run measured: the tower's tokens per block
(the DToMe tower's record, or what the family counts: ``VLMFamily.vision_flops``) and the
LLM's compact and attended lengths. Peak memory is reported on CUDA only. The same code
measures full, DyMU and the matched-budget baselines, because each of them is a setting of
``patch_vlm``.

    rows = [stage_costs(model, one_sample) | {"setting": label} for label in ...]
    print(cost_table(rows))          # flags any setting slower than "full"
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ..patch import get_state
from ..stats import encoder_flops
from .family import family_of

STAGES = ("vision", "prefill", "decode")


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def llm_prefill_flops(cfg: Any, n_compact: int, n_attended: int, logits: int = 0) -> float:
    """Decoder prefill FLOPs: projections and MLP on ``n_compact`` rows, attention scores and
    values over ``n_attended`` positions (the virtual length under VTU), and the LM head on
    ``logits`` rows (``generate`` computes the last one only). Multiply-adds count 2; norms,
    softmax and the vision projector are left out."""
    d, head_dim = cfg.hidden_size, _head_dim(cfg)
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    linear = 2 * n_compact * (2 * d * q + 2 * d * kv + 3 * d * cfg.intermediate_size)
    attention = 2 * 2 * n_attended * n_attended * q
    return cfg.num_hidden_layers * (linear + attention) + 2 * logits * d * cfg.vocab_size


def llm_decode_flops(cfg: Any, steps: int, n_attended: int) -> float:
    """Decode FLOPs of ``steps`` new tokens after a prompt attended over ``n_attended``
    positions: one row of projections and MLP per step, attention over the growing cache."""
    one_row = llm_prefill_flops(cfg, 1, 0, logits=1)
    q = cfg.num_attention_heads * _head_dim(cfg)
    attention = sum(2 * 2 * (n_attended + k + 1) * q for k in range(steps))
    return steps * one_row + cfg.num_hidden_layers * attention


def tower_crop_flops(model: nn.Module) -> list[float]:
    """FLOPs per crop of the tower's last run, from its measured tokens after every block
    (LLaVA-1.5 / OneVision: the patched DToMe tower); [] when the tower kept no record (Qwen's
    tower is not patched: its cost is the vanilla ViT's)."""
    tower = getattr(model.model, "vision_tower", None)
    state = None if tower is None else get_state(tower)
    if state is None or state.last is None:
        return []
    vision = model.config.vision_config
    return [encoder_flops(row, vision.hidden_size, vision.intermediate_size) for row in state.last.counts.tolist()]


def tower_flops(model: nn.Module) -> Optional[float]:
    """FLOPs of the tower's last run summed over crops (``tower_crop_flops``); None without a record."""
    crops = tower_crop_flops(model)
    return sum(crops) if crops else None


def linear_macs(module: nn.Module) -> int:
    """Multiply-adds per row of the linear layers inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


class Clock:
    """Start / stop marks: CUDA events on a GPU (read after one synchronize), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        return end - start


class ForwardTimes:
    """Seconds per forward of the model (``whole``) and of its LLM (``llm``), in call order;
    filled when the ``forward_times`` block ends (one synchronize on a GPU, none per layer)."""

    def __init__(self) -> None:
        self.whole: list[float] = []
        self.llm: list[float] = []

    def stages(self) -> dict[str, float]:
        """The first forward is the prompt's: vision (all of it but the LLM) and prefill; every
        later forward is one decode step."""
        if not self.whole:
            raise ValueError("no forward ran inside the forward_times block")
        return {"vision_s": self.whole[0] - self.llm[0], "prefill_s": self.llm[0], "decode_s": sum(self.whole[1:])}


@contextmanager
def forward_times(model: nn.Module) -> Iterator[ForwardTimes]:
    """Time every forward of ``model`` and of ``model.model.language_model`` inside the block
    (CUDA events on a GPU, perf_counter on a CPU)."""
    clock = Clock(next(model.parameters()).device)
    marks: dict[str, list[list[Any]]] = {"whole": [], "llm": []}

    def opener(key: str):
        return lambda module, args, kwargs: marks[key].append([clock.mark()])

    def closer(key: str):
        return lambda module, args, kwargs, out: marks[key][-1].append(clock.mark())

    llm = model.model.language_model
    hooks = [model.register_forward_pre_hook(opener("whole"), with_kwargs=True),
             model.register_forward_hook(closer("whole"), with_kwargs=True),
             llm.register_forward_pre_hook(opener("llm"), with_kwargs=True),
             llm.register_forward_hook(closer("llm"), with_kwargs=True)]
    times = ForwardTimes()
    try:
        yield times
    finally:
        for hook in hooks:
            hook.remove()
    times.whole = [clock.seconds(a, b) for a, b in marks["whole"]]
    times.llm = [clock.seconds(a, b) for a, b in marks["llm"]]


def _timed_generate(model: nn.Module, inputs: dict, new_tokens: int) -> dict[str, float]:
    """One generate of exactly ``new_tokens`` tokens: seconds per stage."""
    with forward_times(model) as times, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return times.stages()


def stage_costs(model: nn.Module, inputs: dict, new_tokens: int = 8, warmup: int = 1, reps: int = 3) -> dict[str, Any]:
    """Stage times (medians over ``reps`` generates, after ``warmup``), FLOPs and peak memory
    of one sample (``inputs``: a processor output of batch 1) on the model as patched now
    (``patch_vlm``; mode "full" for the unpatched numbers). Seconds per stage, the decode's per
    token too; FLOPs per stage; token counts from the accounting."""
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("stage_costs measures one sample at a time: pass a batch of 1")
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 (one prefill and at least one decode step)")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    for _ in range(warmup):
        _timed_generate(model, inputs, new_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [_timed_generate(model, inputs, new_tokens) for _ in range(reps)]
    acc = model.dymu_vlm.last[0]
    cfg = model.config.get_text_config()
    attended = acc["llm_virtual_length"]
    vision = tower_flops(model)
    row = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    row.update(decode_s_per_token=row["decode_s"] / (new_tokens - 1),
               total_s=row["vision_s"] + row["prefill_s"] + row["decode_s"],
               vision_flops=vision if vision is not None else family_of(model).vision_flops(model, inputs, acc),
               prefill_flops=llm_prefill_flops(cfg, acc["llm_compact_length"], attended, logits=1),
               decode_flops=llm_decode_flops(cfg, new_tokens - 1, attended),
               image_tokens=acc["image_tokens"], llm_compact_length=acc["llm_compact_length"],
               llm_virtual_length=attended, mode=model.dymu_vlm.mode,
               peak_mib=torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None)
    return row


def cost_table(rows: Sequence[dict[str, Any]], reference: str = "full") -> str:
    """Markdown: one line per row (a ``setting`` key names it), times and FLOPs per stage, and
    a flag on every setting whose total time exceeds the ``reference`` setting's on the same
    sample (``sample`` key, if any)."""
    full = {r.get("sample"): r["total_s"] for r in rows if r["setting"] == reference}
    lines = ["| sample | setting | image tokens | vision s | prefill s | decode s/token | total s | "
             "vision GFLOPs | prefill GFLOPs | decode GFLOPs | peak MiB | vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = full.get(r.get("sample"))
        ratio = "" if base is None else f"{r['total_s'] / base:.2f}" + (" SLOWER" if r["total_s"] > base else "")
        gflops = ["-" if r[f"{s}_flops"] is None else f"{r[f'{s}_flops'] / 1e9:.3g}" for s in STAGES]
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r.get('sample', '')} | {r['setting']} | {r['image_tokens']} | {r['vision_s']:.4f} | "
                     f"{r['prefill_s']:.4f} | {r['decode_s_per_token']:.4f} | {r['total_s']:.4f} | "
                     + " | ".join(gflops) + f" | {peak} | {ratio} |")
    return "\n".join(lines)
