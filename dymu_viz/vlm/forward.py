"""The forward of a DyMU-patched VLM, and what ``generate`` needs around it.

``patch_vlm`` swaps the model's class for one whose ``forward`` takes every call in the
processor's coordinates (each image a run of placeholders, as vanilla HF expands it) and runs
the LLM on the compact sequence of that call: text tokens, and for each image (video) its
compact tokens, from the model's family (``family.encode``). The KV cache holds compact
entries; the generation's state (compact mask, virtual layout) lives in that cache
(``DyMUCache``), so it lasts exactly as long as the generation, follows beam reordering, and a
call with a fresh cache never sees an older call's layout. Logits (and hidden states) come back
in the input's coordinates: each position gets those of the compact token standing there.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass, field, fields
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import classswap
from ..vtu import VirtualLayout, VTUTrack, find_decoder
from .cache import GenerationState, adopt
from .chunk import Chunk, chunk_rope, compact_chunk, compact_rope, plain_chunk, virtual_block
from .family import VisualInput, VLMFamily, family_of


@dataclass
class VLMState:
    """``model.dymu_vlm``: the mode and kernel, the family's settings (what ``family.configure``
    returned), and ``last``, the per-sample accounting of the last forward that read a prompt
    (decode steps leave it as it is): encoder_tokens (tower output, summed over crops) and
    crop_tokens (per crop); image_tokens (compact image rows in the LLM: for OneVision the crop
    tokens its layout uses plus newline and blend tokens) and image_positions (virtual image
    length); text_tokens; llm_compact_length and llm_virtual_length (positions the LLM attends
    over, cache included; the compact length in "compact" and "full" modes); with in-tower unit
    merging, tower_tokens: per image, its units, then its tokens after every ViT block."""

    mode: str
    kernel: str
    family: str = ""
    settings: Any = None
    last: list[dict[str, Any]] = field(default_factory=list)
    prompt_entries: int = 0  # compact cache entries (padded) after the last prompt forward

    # The settings of families that merge after their tower, by the names earlier releases used:
    # one threshold per round (None: no merging), the rounds' metric, the threshold across video
    # time steps, the matching window; and the pooling baseline of tower families.
    @property
    def unit_thresholds(self) -> Optional[list[float]]:
        return getattr(self.settings, "rounds", None)

    @property
    def unit_metric(self) -> str:
        return getattr(self.settings, "metric", "keys")

    @property
    def temporal(self) -> Optional[float]:
        return getattr(self.settings, "temporal", None)

    @property
    def window(self) -> Optional[int]:
        return getattr(self.settings, "window", None)

    @property
    def reduction(self) -> Any:
        """The baseline on the tower's output (pooling or random pruning), or None."""
        return getattr(self.settings, "reduction", None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A state pickled by an earlier release kept the family settings as its own fields: they
        become the settings here (every family reads its own names from them)."""
        if "settings" not in state:
            old = {name: state.pop(name, None) for name in ("unit_thresholds", "unit_metric", "temporal", "window",
                                                            "pool")}
            state["settings"] = SimpleNamespace(rounds=old["unit_thresholds"], metric=old["unit_metric"] or "keys",
                                                temporal=old["temporal"], window=old["window"],
                                                reduction=old["pool"])
            state.setdefault("family", "")
        self.__dict__.update(state)


@functools.lru_cache(maxsize=None)
def cache_argument(function: Any) -> str:
    """What HF calls the KV cache argument of a forward: ``cache`` from transformers 5.24 (the
    old name only warns until 5.40), ``past_key_values`` before. Asked once per class's forward:
    each decode step calls it."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


@functools.lru_cache(maxsize=None)
def cache_field(output: type) -> str:
    """What HF calls the KV cache field of an output class (renamed as ``cache_argument``)."""
    return "cache" if "cache" in {f.name for f in fields(output)} else "past_key_values"


def _output_class(model: nn.Module) -> type:
    """The output class the model's own forward returns: its family's own, else the generic one
    its modeling module uses (a mixture-of-experts model's has router fields, left empty here)."""
    from transformers import modeling_outputs

    base = classswap.base_class(model)
    module = sys.modules[base.__module__]
    name = base.__name__.replace("ForConditionalGeneration", "CausalLMOutputWithPast")
    return getattr(module, name, None) or getattr(module, "MoeCausalLMOutputWithPast", None) or \
        modeling_outputs.CausalLMOutputWithPast


def _gather_positions(x: Tensor, rows: Tensor) -> Tensor:
    """(B, P, D) compact rows -> (B, L, D) at the input positions ``rows`` (B, L)."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


UNSUPPORTED = {"mm_encoder_outputs": "precomputed mm_encoder_outputs: DyMU must run the vision tower itself",
               "inputs_embeds": "inputs_embeds: DyMU finds the image placeholders in input_ids"}
NOT_SUPPORTED_DECODING = ("assisted decoding and prompt-lookup decoding are not supported with DyMU (they crop the KV "
                          "cache by input positions; DyMU's cache holds compact tokens)")


def vlm_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a DyMU-patched VLM (same signature and outputs as the model's own)."""
    state: VLMState = self.__dict__["dymu_vlm"]
    family = family_of(self)
    bound = inspect.signature(classswap.base_class(self).forward).bind(self, *args, **kwargs)
    a = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
    for name, why in UNSUPPORTED.items():
        if a.get(name) is not None:
            raise NotImplementedError(f"DyMU does not support {why}")
    if a.get("output_attentions"):
        raise NotImplementedError("DyMU does not return attention weights (VTU attends over virtual copies)")
    for name in family.config_arguments:
        if a.get(name) is not None and a[name] != getattr(self.config, name, None):
            raise NotImplementedError(f"DyMU uses the model config's {name}; set model.config.{name} instead")
    input_ids = a.get("input_ids")
    if input_ids is None:
        raise ValueError("a DyMU-patched VLM needs input_ids")
    B, L = input_ids.shape
    device = input_ids.device
    use_cache = a.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(self.config.get_text_config(), "use_cache", True))
    cache = a.get("cache", a.get("past_key_values"))
    if cache is None and use_cache:
        from transformers import DynamicCache
        cache = DynamicCache(config=self.config.get_text_config())
    gen = adopt(cache, B, device).dymu if cache is not None else \
        GenerationState(torch.zeros((B, 0), dtype=torch.long, device=device))
    if gen.compact_mask.shape[0] != B:
        raise ValueError(f"the cache holds {gen.compact_mask.shape[0]} rows but input_ids has {B}")

    full_mask = a.get("attention_mask")
    if full_mask is not None and full_mask.dim() != 2:
        raise ValueError("a DyMU-patched VLM takes a 2-D attention_mask (batch, tokens)")
    mask = torch.ones_like(input_ids) if full_mask is None else full_mask[:, -L:].to(device)
    items = {visual: family.encode(self, state.settings, visual, a)
             for visual in family.inputs if a.get(visual.pixels) is not None}
    # In a later call of a generation (a cache holds the prompt) placeholders that come with no
    # pixels are ordinary tokens, as in vanilla HF (a model may generate one); in a prompt the
    # first input's (images') mean a missing image, an error.
    first = family.inputs[0]
    placeholders_are_text = not items and gen.n_compact > 0
    plain = not items and bool(mask.all()) and \
        (placeholders_are_text or not bool((input_ids == getattr(self.config, first.token)).any()))
    media = {} if placeholders_are_text else _media(self, family, items, first)
    chunk = plain_chunk(self, input_ids) if plain else compact_chunk(self, input_ids, mask, media)

    first_row, P = gen.n_compact, chunk.mask.shape[1]
    gen.compact_mask = torch.cat([gen.compact_mask, chunk.mask], 1)
    gen.offset += L - P
    slot_rope = chunk_rope(family, self, gen, chunk, input_ids, mask, a, plain)
    if state.mode == "vtu":
        if gen.track is None:
            empty = torch.zeros((B, 0), dtype=torch.long, device=device)
            gen.track = VTUTrack(VirtualLayout(empty, empty, empty.bool()), 0)
        gen.track.append(virtual_block(chunk, gen.track, first_row, slot_rope), P)
        find_decoder(self.model.language_model).dymu_vtu.track = gen.track
    if slot_rope is not None and state.mode != "vtu":
        position_ids = compact_rope(chunk, slot_rope)  # (3, B, P) multi-row RoPE positions
    else:
        position_ids = (gen.compact_mask.cumsum(-1) - 1).clamp_min(0)[:, -P:]  # consecutive (VTU ignores them)

    language_model = self.model.language_model
    out = language_model(inputs_embeds=chunk.embeds, attention_mask=gen.compact_mask, position_ids=position_ids,
                         **{cache_argument(type(language_model).forward): cache}, use_cache=use_cache,
                         output_hidden_states=a.get("output_hidden_states"), **family.llm_arguments(chunk))
    if L > 1 or items:
        _account(state, gen, chunk)
    keep = a.get("logits_to_keep", 0)
    rows = chunk.rows if isinstance(keep, int) and keep == 0 else \
        chunk.rows[:, -keep:] if isinstance(keep, int) else chunk.rows[:, keep.to(device)]
    logits = self.lm_head(_gather_positions(out.last_hidden_state, rows.to(out.last_hidden_state.device)))
    loss = None
    if a.get("labels") is not None:
        loss = self.loss_function(logits=logits, labels=a["labels"], vocab_size=self.config.get_text_config().vocab_size)
    hidden = None if out.hidden_states is None else \
        tuple(_gather_positions(h, chunk.rows.to(h.device)) for h in out.hidden_states)
    output = _output_class(self)
    result = output(loss=loss, logits=logits, hidden_states=hidden,
                    **{cache_field(output): cache if use_cache else None})
    return result if a.get("return_dict", True) is not False else result.to_tuple()


def _media(model: nn.Module, family: VLMFamily, items: dict[VisualInput, list], first: VisualInput) -> dict:
    """Placeholder id -> (kind, placeholder as written, items) for compact_chunk: every input
    given, and the first (images) always, so that its placeholders without pixels are an error."""
    given = {first: items.get(first, [])} | items
    return {getattr(model.config, v.token): (v.kind, family.placeholder(v.kind), tokens, v.spans_runs)
            for v, tokens in given.items()}


def _runs_its_own_vision(self: nn.Module) -> bool:
    """generate would encode the images with the unpatched tower before the first forward; a
    patched model encodes them itself (DToMe), from pixel_values."""
    return False


def fill_rows(per_row: list[int], lengths: list[int]) -> list[int]:
    """How many items each prompt row holds: the items, in order, whose placeholder counts
    (``lengths``) fill each row's placeholders (``per_row``; a single placeholder standing for a
    whole item counts it too)."""
    counts, taken = [], 0
    for need in per_row:
        start = taken
        while need > 0 and taken < len(lengths):
            need, taken = need - lengths[taken], taken + 1
        counts.append(taken - start)
    return counts


def _expand_per_sample(self: nn.Module, expand_size: int = 1, is_encoder_decoder: bool = False,
                       input_ids: Optional[Tensor] = None, **model_kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
    """generate's batch expansion (beam search, num_return_sequences) repeats every tensor row by
    row. Visual inputs are per item (or per patch row), not per sample, so they are repeated
    here per sample, each sample's items together, as the expanded prompts need them; which
    items a sample holds is read from its placeholders (the family says how many each item
    takes). The rest expands as usual."""
    base = inspect.getattr_static(classswap.base_class(self), "_expand_inputs_for_generation")
    base = base.__func__ if isinstance(base, staticmethod) else functools.partial(base, self)  # static before 5.23
    family = family_of(self)
    expanded: dict[str, Any] = {}
    for visual in family.inputs:
        items = {k: model_kwargs.pop(k) for k in visual.keys if model_kwargs.get(k) is not None}
        if visual.pixels not in items or input_ids is None or expand_size == 1:
            expanded.update(items)
            continue
        lengths = family.item_lengths(self, visual, {**model_kwargs, **items, "input_ids": input_ids})
        per_row = (input_ids == getattr(self.config, visual.token)).sum(-1).tolist()
        counts = fill_rows(per_row, lengths)
        first = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
        order = [i for f, n in zip(first, counts) for _ in range(expand_size) for i in range(f, f + n)]
        for key, value in items.items():
            if key == visual.pixels:  # the family says how many rows each item takes
                chunks = value.split(family.item_rows(self, visual, {**items, "input_ids": input_ids}))
                expanded[key] = torch.cat([chunks[i] for i in order])
            else:
                expanded[key] = value[torch.tensor(order, device=value.device)]
    input_ids, model_kwargs = base(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                   input_ids=input_ids, **model_kwargs)
    return input_ids, {**model_kwargs, **expanded}


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """HF's generate, refusing the decoding strategies that crop the KV cache by position."""
    config = kwargs.get("generation_config") or self.generation_config
    if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") or \
            getattr(config, "prompt_lookup_num_tokens", None) or kwargs.get("assistant_early_exit") or \
            getattr(config, "assistant_early_exit", None):
        raise NotImplementedError(NOT_SUPPORTED_DECODING)
    return classswap.base_class(self).generate(self, *args, **kwargs)


classswap.register("vlm", vlm_forward, _supports_mm_encoder_outputs=_runs_its_own_vision,
                   _expand_inputs_for_generation=_expand_per_sample, generate=_generate)


def _account(state: VLMState, gen: GenerationState, chunk: Chunk) -> None:
    compact = gen.compact_mask.sum(-1).tolist()
    virtual = gen.track.layout.valid.sum(-1).tolist() if gen.track is not None else compact
    state.last = [{**acc, "llm_compact_length": c, "llm_virtual_length": v}
                  for acc, c, v in zip(chunk.accounting, compact, virtual)]
    state.prompt_entries = gen.n_compact
