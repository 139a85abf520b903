"""DyMU in HF vision-language models: DToMe in the vision tower (or on its output), compact
image features spliced where the image placeholders are, VTU in the RoPE decoder, all behind the
model's own ``forward``.

    dymu_viz.vlm.patch_vlm(model, thresholds)                 # DToMe + VTU (mode="vtu")
    out = model.generate(**processor(images=..., text=..., return_tensors="pt"))   # HF's own call
    model.dymu_vlm.last                                       # per-sample token accounting
    dymu_viz.vlm.unpatch_vlm(model)

Modes: "vtu" (the LLM runs as if the full-length image were there), "compact" (the paper's "w/o
VTU" ablation: compact tokens at consecutive positions) and "full" (no merging: the unpatched
model's numbers). What differs between model families is asked of the model's family
(``dymu_viz.vlm.family``); the patched forward is ``dymu_viz.vlm.forward``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import classswap
from ..thresholds import Thresholds
from ..versions import check_transformers
from ..vtu import cache_bytes, find_decoder, patch_llm, unpatch_llm
from .cache import DyMUCache
from .chunk import compact_chunk  # noqa: F401  (re-exported: dymu_viz.vlm.pipeline.compact_chunk)
from .family import family_of
from .forward import VLMState, cache_field
from .tokens import ImageTokens
from .reductions import Baseline

MODES = ("vtu", "compact", "full")


@dataclass
class GenerateOutput:
    sequences: Tensor  # (rows, new tokens)
    accounting: list[dict[str, Any]]
    texts: Optional[list[str]] = None  # decoded new tokens (chat only)


def _state(model: nn.Module) -> VLMState:
    state = model.__dict__.get("dymu_vlm")
    if state is None:
        raise ValueError("call dymu_viz.vlm.patch_vlm(model, thresholds) first")
    return state


def patch_vlm(model: nn.Module, thresholds: Union[Thresholds, list[float], float, Baseline, None] = None,
              mode: str = "vtu", kernel: str = "sdpa", backend: str = "native", cache: str = "decode_fast",
              metric: Optional[str] = None, temporal: Optional[float] = None,
              window: Optional[int] = None, tower: Optional[Sequence[Optional[float]]] = None) -> nn.Module:
    """DToMe in the vision tower (thresholds None: no merging) and, in "vtu" mode, VTU in the LLM
    (kernel, scatter backend and KV-cache policy as in ``dymu_viz.vtu.patch_llm``). Afterwards
    the model's own ``forward`` / ``generate`` run DyMU. Patching a patched model changes its
    settings. A ``baselines.ToMe`` or ``baselines.Pool`` in place of the thresholds runs that
    matched-budget baseline through the same LLM path (families that merge inside the tower).

    Families that merge after their tower (Qwen2-VL / Qwen2.5-VL): the tower stays vanilla and
    thresholds are the DToMe rounds on its output units (see ``dymu_viz.vlm.qwen``), one per
    round; metric: their similarity (``qwen.METRICS``; default: the one calibrated thresholds
    were found with, else "keys"); temporal: a threshold for merging tokens of neighbouring
    video time steps after each step's rounds (``qwen.merge_time_steps``; default: the one
    ``qwen.calibrate_temporal`` recorded in the thresholds, else None: every time step is merged
    on its own); window: restricted matching for large images, inside blocks of window x window
    units (``qwen.window_order``; default: the calibrated one, else None: the whole image);
    tower: DToMe *inside* the ViT, one threshold per block (None: that block does not merge),
    on whole 2 x 2 units with the attention on the virtual layout (``dymu_viz.vlm.unit_tower``;
    default: the ones the thresholds record, else None: the tower runs as HF's); the rounds
    then continue with the tower's groups. Other families refuse these options."""
    check_transformers()
    family = family_of(model)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    settings = family.configure(model, thresholds, mode, {"metric": metric, "temporal": temporal, "window": window,
                                                                   "tower": tower})
    if mode == "vtu":
        patch_llm(model.model.language_model, kernel, backend, cache)
    elif getattr(find_decoder(model.model.language_model), "dymu_vtu", None) is not None:
        unpatch_llm(model.model.language_model)
    model.dymu_vlm = VLMState(mode, kernel, family.name, settings)
    if not classswap.is_swapped(model, "vlm"):
        classswap.swap_in(model, "vlm")
    return model


def unpatch_vlm(model: nn.Module) -> nn.Module:
    """Undo patch_vlm: the model's own class, tower and LLM again."""
    if model.__dict__.pop("dymu_vlm", None) is None:
        raise ValueError(f"{type(model).__name__} is not patched by dymu_viz.vlm")
    family_of(model).unpatch(model)
    if getattr(find_decoder(model.model.language_model), "dymu_vtu", None) is not None:
        unpatch_llm(model.model.language_model)
    classswap.swap_out(model)
    return model


# ---------------------------------------------------------------------------------------------
# Conveniences over the model's own calls


@torch.no_grad()
def logits(model: nn.Module, input_ids: Tensor, pixel_values: Optional[Tensor] = None,
           attention_mask: Optional[Tensor] = None, **image_kwargs: Any) -> tuple[Tensor, list[dict[str, Any]]]:
    """Next-token logits at every input position, (B, L, vocab), and the per-sample accounting."""
    _state(model)
    out = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=False,
                **image_kwargs)
    return out.logits, _state(model).last


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, pixel_values: Optional[Tensor] = None,
             attention_mask: Optional[Tensor] = None, **generate_kwargs: Any) -> GenerateOutput:
    """``model.generate`` on a patched model, returning only the new tokens and the accounting
    of each returned sequence, with its KV cache: policy, entries (compact tokens, the values'
    rows), key entries (per virtual slot with the decode-fast policy) and bytes (image_sizes and
    every other generate argument pass through)."""
    state = _state(model)
    out = model.generate(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                         return_dict_in_generate=True, **generate_kwargs)
    new = out.sequences[:, input_ids.shape[1]:]
    prompts, rows = input_ids.shape[0], len(state.last)
    per_prompt_rows, per_prompt_sequences = rows // prompts, new.shape[0] // prompts
    cache = getattr(out, cache_field(type(out)), None)
    appended = cache.compact_length() - state.prompt_entries if isinstance(cache, DyMUCache) else 0
    per_row_bytes = cache_bytes(cache) // max(cache.dymu.compact_mask.shape[0], 1) if isinstance(cache, DyMUCache) else 0
    vtu = getattr(find_decoder(model.model.language_model), "dymu_vtu", None)
    policy = vtu.cache if vtu is not None else "plain"  # the VTU state's: it may have fallen back to "compact"
    accounting = []
    for j in range(new.shape[0]):
        acc = dict(state.last[(j // per_prompt_sequences) * per_prompt_rows])
        keys = acc["llm_virtual_length"] if policy == "decode_fast" else acc["llm_compact_length"]
        acc.update(generated_tokens=int(new.shape[1]), kv_cache_policy=policy,
                   kv_cache_entries=acc["llm_compact_length"] + appended, kv_key_entries=keys + appended,
                   kv_cache_bytes_per_sample_padded=per_row_bytes)
        accounting.append(acc)
    return GenerateOutput(new, accounting)


def images_per_prompt(images: list[list[Any]]) -> Optional[list[list[Any]]]:
    """What a processor gets for prompts holding ``images[i]`` each: the images nested per prompt
    (prompts without one included), so that a processor that treats a prompt's several images
    differently from a single one (OneVision: base crop only) knows which go together; None when
    no prompt holds one."""
    return images if any(images) else None


def prompt_inputs(processor: Any, images: Sequence[Any], questions: Sequence[str]) -> dict[str, Any]:
    """The processor's forward arguments (CPU tensors, padded as it pads) for one chat-template
    prompt per question, each with its images (None, one image, or a list) before its text: the
    user's own path, so the processor's own defaults apply (which its sub-processors alone may lack)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} image entries but {len(questions)} questions; give one entry per question "
                         "(None, an image, or a list of images)")
    per_question = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(ims) + [{"type": "text", "text": q}]}],
        add_generation_prompt=True) for ims, q in zip(per_question, questions)]
    return dict(processor(images=images_per_prompt(per_question), text=prompts, return_tensors="pt", padding=True))


def on_device(model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs``' tensors moved to the model's device (dtypes kept: the model casts its pixels)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def chat(model: nn.Module, processor: Any, images: list[Any], questions: list[str],
         **generate_kwargs: Any) -> GenerateOutput:
    """Plain questions in, answers out: each question with its images (None, one image, or a
    list) goes through the processor's chat template, then the processor and ``generate``."""
    out = generate(model, **on_device(model, prompt_inputs(processor, images, questions)), **generate_kwargs)
    out.texts = processor.batch_decode(out.sequences, skip_special_tokens=True)
    return out


@torch.no_grad()
def encode_images(model: nn.Module, processor: Any, images: Sequence[Any], batch_size: int = 8) -> list[ImageTokens]:
    """Each image's tokens as the model's forward splices them when the image is alone in its
    prompt (an entry that is a list of images: those together in one prompt, one result each): ``features`` (n, D), the compact tokens the LLM computes on, and ``mapping``, the token
    of each unit (patch, or 2 x 2 patches). Merged under ``patch_vlm``'s settings (after
    ``patch_vlm(model, None)``: the vanilla tokens). The pixels come from the processor's own call
    (its defaults apply, unlike ``processor.image_processor`` alone), ``batch_size`` prompts at a time."""
    settings, family = _state(model).settings, family_of(model)
    tokens: list[ImageTokens] = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start:start + batch_size])
        inputs = on_device(model, prompt_inputs(processor, batch, [""] * len(batch)))
        tokens += family.encode(model, settings, family.inputs[0], inputs)
    return tokens
