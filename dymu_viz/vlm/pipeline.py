"""DyMU in HF LLaVA models: DToMe in the vision tower, compact image features spliced where the
image placeholders are, VTU in the RoPE decoder, all behind the model's own ``forward``.

    dymu_viz.vlm.patch_vlm(model, thresholds)                 # DToMe + VTU (mode="vtu")
    out = model.generate(**processor(images=..., text=..., return_tensors="pt"))   # HF's own call
    model.dymu_vlm.last                                       # per-sample token accounting
    dymu_viz.vlm.unpatch_vlm(model)

Modes: "vtu" (the LLM runs as if the full-length image were there), "compact" (the paper's "w/o
VTU" ablation: compact tokens at consecutive positions) and "full" (no merging: the unpatched
model's numbers).

``patch_vlm`` swaps the model's class for one whose ``forward`` takes every call in the
processor's coordinates (each image a run of placeholders, as vanilla HF expands it) and runs
the LLM on the compact sequence of that call: text tokens, and for each image its compact
tokens (``ImageTokens``, one function per family). The KV cache holds compact entries; the
generation's state (compact mask, virtual layout) lives in that cache (``DyMUCache``), so it
lasts exactly as long as the generation, follows beam reordering, and a call with a fresh cache
never sees an older call's layout. Logits (and hidden states) come back in the input's
coordinates: each position gets those of the compact token standing there.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import classswap
from ..patch import patch, unpatch
from ..thresholds import Thresholds
from ..vtu import VirtualLayout, VTUTrack, cache_bytes, find_decoder, patch_llm, unpatch_llm
from .baselines import Baseline, Pool, ToMe, pool_groups
from .cache import DyMUCache, GenerationState, adopt
from .common import ImageTokens, llava_images
from .onevision import onevision_images
from .qwen import METRICS, QWEN_FAMILIES, ROUNDS_KIND, qwen_images, rope_positions

MODES = ("vtu", "compact", "full")
FAMILIES: dict[str, Callable[..., list[ImageTokens]]] = {
    "LlavaForConditionalGeneration": llava_images,
    "LlavaOnevisionForConditionalGeneration": onevision_images,
    **{name: qwen_images for name in QWEN_FAMILIES},
}


@dataclass
class VLMState:
    """``model.dymu_vlm``: the mode and kernel, and ``last``, the per-sample accounting of the
    last forward that read a prompt (decode steps leave it as it is): encoder_tokens (tower
    output, summed over crops) and crop_tokens (per crop); image_tokens (compact image rows in
    the LLM: for OneVision the crop tokens its layout uses plus newline and blend tokens) and
    image_positions (virtual image length); text_tokens; llm_compact_length and
    llm_virtual_length (positions the LLM attends over, cache included; the compact length in
    "compact" and "full" modes). unit_thresholds: Qwen2-VL's DToMe rounds after the PatchMerger
    (one threshold per round; None: no merging); unit_metric: their similarity metric;
    temporal: the threshold for merging across a video's time steps (None: none); window: the
    rounds match inside blocks of window x window units (None: the whole image)."""

    mode: str
    kernel: str
    unit_thresholds: Optional[list[float]] = None
    unit_metric: str = "keys"
    temporal: Optional[float] = None
    window: Optional[int] = None
    pool: Optional[Pool] = None  # the pooling baseline, applied to the tower's output patches
    last: list[dict[str, Any]] = field(default_factory=list)
    prompt_entries: int = 0  # compact cache entries (padded) after the last prompt forward


@dataclass
class GenerateOutput:
    sequences: Tensor  # (rows, new tokens)
    accounting: list[dict[str, Any]]
    texts: Optional[list[str]] = None  # decoded new tokens (chat only)


def _images_of(model: nn.Module) -> Callable[..., list[ImageTokens]]:
    name = classswap.base_class(model).__name__
    if name not in FAMILIES:
        raise TypeError(f"expected one of {', '.join(FAMILIES)}, got {name}")
    return FAMILIES[name]


def _state(model: nn.Module) -> VLMState:
    state = model.__dict__.get("dymu_vlm")
    if state is None:
        raise ValueError("call dymu_viz.vlm.patch_vlm(model, thresholds) first")
    return state


def patch_vlm(model: nn.Module, thresholds: Union[Thresholds, list[float], float, Baseline, None] = None,
              mode: str = "vtu", kernel: str = "sdpa", backend: str = "native", cache: str = "decode_fast",
              metric: Optional[str] = None, temporal: Optional[float] = None,
              window: Optional[int] = None) -> nn.Module:
    """DToMe in the vision tower (thresholds None: no merging) and, in "vtu" mode, VTU in the LLM
    (kernel, scatter backend and KV-cache policy as in ``dymu_viz.vtu.patch_llm``). Afterwards
    the model's own ``forward`` / ``generate`` run DyMU. Patching a patched model changes its
    settings. Qwen2-VL / Qwen2.5-VL: the tower stays vanilla and thresholds are the DToMe rounds
    on its output units (see ``dymu_viz.vlm.qwen``), one per round; metric: their similarity
    (``qwen.METRICS``; default: the one calibrated thresholds were found with, else "keys");
    temporal: a threshold for merging tokens of neighbouring video time steps after each step's
    rounds (``qwen.merge_time_steps``; default: the one ``qwen.calibrate_temporal`` recorded in the
    thresholds, else None: every time step is merged on its own); window: restricted matching for
    large images, inside blocks of window x window units (``qwen.window_order``; default: the
    calibrated one, else None: the whole image). A ``baselines.ToMe`` or ``baselines.Pool`` in
    place of the thresholds runs that matched-budget baseline through the same LLM path."""
    _images_of(model)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    rounds, unit_metric = None, unit_metric_of(thresholds, metric)
    if isinstance(thresholds, (ToMe, Pool)):
        if is_qwen(model):
            raise ValueError("the matched-budget baselines (ToMe, Pool) are for LLaVA-1.5 / OneVision towers")
        if isinstance(thresholds, Pool):  # a grid the tower's patches cannot be pooled to fails here, not later
            vision = model.config.vision_config
            pool_groups(vision.image_size // vision.patch_size, thresholds.rows, thresholds.cols, torch.device("cpu"))
    if is_qwen(model):
        rounds = None if mode == "full" else unit_round_thresholds(thresholds)
        if isinstance(thresholds, Thresholds):  # what calibrate_rounds / calibrate_temporal recorded
            temporal = thresholds.metadata.get("temporal") if temporal is None else temporal
            calibrated = thresholds.metadata.get("window")
            if window is not None and calibrated is not None and int(window) != calibrated:
                raise ValueError(f"these thresholds were calibrated with window={calibrated}, not {window}")
            window = calibrated if window is None else window
        if window is not None and int(window) < 2:
            raise ValueError(f"window must be at least 2 units per side, got {window}")
        if temporal is not None and not float(temporal) == float(temporal):
            raise ValueError("the temporal threshold is NaN")
    elif metric is not None or temporal is not None or window is not None:
        raise ValueError("metric, temporal and window set Qwen2-VL's rounds after the PatchMerger; LLaVA towers "
                         "merge on their own keys, and their video input is not supported")
    elif isinstance(thresholds, ToMe):
        patch(model.model.vision_tower, None, r=None if mode == "full" else list(thresholds.r))
    else:
        patch(model.model.vision_tower, None if mode == "full" or isinstance(thresholds, Pool)
              else onevision_tower_thresholds(model, thresholds))
    if mode == "vtu":
        patch_llm(model.model.language_model, kernel, backend, cache)
    elif getattr(find_decoder(model.model.language_model), "dymu_vtu", None) is not None:
        unpatch_llm(model.model.language_model)
    model.dymu_vlm = VLMState(mode, kernel, rounds, unit_metric,
                              None if mode == "full" or temporal is None else float(temporal),
                              None if window is None else int(window),
                              thresholds if isinstance(thresholds, Pool) and mode != "full" else None)
    if not classswap.is_swapped(model, "vlm"):
        classswap.swap_in(model, "vlm")
    return model


def is_qwen(model: nn.Module) -> bool:
    return classswap.base_class(model).__name__ in QWEN_FAMILIES


def unit_metric_of(thresholds: Any, metric: Optional[str]) -> str:
    """The rounds' metric: ``metric`` if given, else the one calibrated thresholds record, else
    "keys"; a metric other than the calibrated one is refused (its thresholds would not fit)."""
    calibrated = thresholds.metadata.get("metric") if isinstance(thresholds, Thresholds) else None
    if metric is not None and metric not in METRICS:
        raise ValueError(f"unknown unit metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric is not None and calibrated is not None and metric != calibrated:
        raise ValueError(f"these thresholds were calibrated with metric={calibrated!r}, not {metric!r}")
    return metric or calibrated or "keys"


def unit_round_thresholds(thresholds: Union[Thresholds, Sequence[float], float, None]) -> Optional[list[float]]:
    """Qwen's DToMe rounds: a ``Thresholds`` (one value per round), a sequence of floats, or
    None (no merging). A single float is refused: the number of rounds must be explicit."""
    if thresholds is None:
        return None
    if isinstance(thresholds, Thresholds) and thresholds.metadata.get("kind") != ROUNDS_KIND:
        raise ValueError(f"these thresholds ({thresholds.model or 'an encoder'}, {thresholds.layers} layers) were "
                         "calibrated for the layers of a ViT, not for DToMe rounds after Qwen's PatchMerger; calibrate "
                         "rounds with dymu_viz.vlm.qwen.calibrate_rounds (or pass a plain list, one value per round)")
    if isinstance(thresholds, (int, float)):
        raise ValueError("Qwen2-VL models take one threshold per DToMe round after the PatchMerger, e.g. "
                         "[0.9] * 6 for six rounds; a single number does not say how many rounds")
    values = [float(v) for v in (thresholds.values if isinstance(thresholds, Thresholds) else thresholds)]
    if any(v != v for v in values):
        raise ValueError("a round threshold is NaN")
    return values


def onevision_tower_thresholds(model: nn.Module, thresholds: Any) -> Any:
    """LLaVA-OneVision's tower is SO400M with its last layer deleted (26 of 27 layers), and the
    reference's SO400M threshold files have 27 values, of which its tower uses the first 26. Such
    a file is mapped the same way here, with a warning that says so; any other depth mismatch
    stays an error (raised by ``patch``)."""
    if classswap.base_class(model).__name__ != "LlavaOnevisionForConditionalGeneration" or \
            thresholds is None or isinstance(thresholds, (int, float)):
        return thresholds
    depth = model.config.vision_config.num_hidden_layers
    if len(thresholds.values if isinstance(thresholds, Thresholds) else thresholds) != depth + 1:
        return thresholds
    warnings.warn(f"{depth + 1}-layer thresholds on LLaVA-OneVision's {depth}-layer tower: layers 0-{depth - 1} are "
                  f"used and the last threshold is not, as in the reference (its tower drops SO400M's last layer "
                  f"too); pass thresholds.truncated({depth}) to map it yourself", stacklevel=3)
    return thresholds.truncated(depth) if isinstance(thresholds, Thresholds) else list(thresholds)[:depth]


def unpatch_vlm(model: nn.Module) -> nn.Module:
    """Undo patch_vlm: the model's own class, tower and LLM again."""
    if model.__dict__.pop("dymu_vlm", None) is None:
        raise ValueError(f"{type(model).__name__} is not patched by dymu_viz.vlm")
    if not is_qwen(model):
        unpatch(model.model.vision_tower)
    if getattr(find_decoder(model.model.language_model), "dymu_vtu", None) is not None:
        unpatch_llm(model.model.language_model)
    classswap.swap_out(model)
    return model


# ---------------------------------------------------------------------------------------------
# One forward: the input chunk -> its compact chunk


@dataclass
class Chunk:
    """The compact form of one forward's input_ids (B, L): embeds (B, P, D) and mask (B, P),
    left-padded; slots: per row, the compact row (0..P-1) of each of its virtual slots, in order;
    rows: (B, L) the compact row standing at every input position; accounting per row."""

    embeds: Tensor
    mask: Tensor
    slots: list[Tensor]
    rows: Tensor
    accounting: list[dict[str, Any]]


def _runs(flags: Tensor) -> list[tuple[int, int]]:
    """[begin, end) of every run of True in a 1-D bool tensor."""
    edges = torch.diff(torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).long())
    return list(zip(edges.eq(1).nonzero().squeeze(1).tolist(), edges.eq(-1).nonzero().squeeze(1).tolist()))


def compact_chunk(model: nn.Module, input_ids: Tensor, mask: Tensor, images: Optional[list[ImageTokens]],
                  videos: Sequence[ImageTokens] = ()) -> Chunk:
    """Replace the image (and video) placeholders of input_ids (B, L) by the compact tokens of
    ``images`` (``videos``), in order (images None, or no videos: those placeholders are
    ordinary tokens).

    Images are assigned to placeholders as HF does (row by row, left to right); each takes as
    many placeholders as it has virtual positions (the processor's expansion), or a single
    placeholder standing for all of them. Videos likewise, to the video placeholders. Positions
    with mask 0 are dropped (padding)."""
    B, L = input_ids.shape
    device = input_ids.device
    text = model.get_input_embeddings()(input_ids)  # (B, L, D); placeholder rows are replaced
    media = {} if images is None else {model.config.image_token_id: ("image", images)}
    if videos:
        media[model.config.video_token_id] = ("video", videos)
    feeds = {token: iter(enumerate(items)) for token, (_, items) in media.items()}
    rows_feats, rows_slots, accounting = [], [], []
    rows = torch.zeros((B, L), dtype=torch.long, device=device)
    for b in range(B):
        valid = mask[b].bool()
        placeholders = {token: (input_ids[b] == token) & valid for token in media}
        is_image = torch.stack(list(placeholders.values())).any(0) if placeholders else torch.zeros_like(valid)
        runs = sorted((begin, end, token) for token, flags in placeholders.items() for begin, end in _runs(flags))
        feats, slots, n, cursor = [], [], 0, 0
        acc = _row_accounting()
        for begin, end, token in runs + [(L, L, None)]:
            between = (valid[cursor:begin] & ~is_image[cursor:begin]).nonzero().squeeze(1) + cursor
            k = len(between)
            feats.append(text[b, between])
            slots.append(n + torch.arange(k, device=device))
            rows[b, between] = n + torch.arange(k, device=device)
            n, acc["text_tokens"] = n + k, acc["text_tokens"] + k
            p = begin
            while p < end:
                kind, items = media[token]
                i, image = next(feeds[token], (None, None))
                if image is None:
                    raise ValueError(f"{len(items)} {kind}s given but the prompts hold more {kind} placeholders; "
                                     f"give one {kind} per <{kind}> in the prompts")
                V = len(image.mapping)
                take = 1 if (end - p == 1 and V != 1) else V
                if end - p < take:
                    raise ValueError(f"{kind} {i} has {V} positions but only {end - p} {kind} placeholders are left "
                                     "where it goes; expand prompts with the model's own processor")
                mapping = image.mapping.to(device)
                feats.append(image.features.to(text.device, text.dtype))
                slots.append(n + mapping)
                rows[b, p:p + take] = n + (mapping if take == V else mapping[:1])
                n += len(image.features)
                acc["crop_tokens"] += image.crop_tokens
                acc["image_tokens"] += len(image.features)
                acc["image_positions"] += V
                p += take
            cursor = end
        acc["encoder_tokens"] = sum(acc["crop_tokens"])
        rows_feats.append(torch.cat(feats))
        rows_slots.append(torch.cat(slots))
        accounting.append(acc)
    for token, (kind, items) in media.items():
        left = sum(1 for _ in feeds[token])
        if left:
            raise ValueError(f"{len(items)} {kind}s given but the prompts hold {kind} placeholders for "
                             f"{len(items) - left}; give one {kind} per <{kind}> in the prompts")
    P = max(len(f) for f in rows_feats)
    embeds = text.new_zeros((B, P, text.shape[-1]))
    compact_mask = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, f in enumerate(rows_feats):
        pad = P - len(f)
        embeds[b, pad:], compact_mask[b, pad:] = f, 1
        rows_slots[b] = rows_slots[b] + pad
        rows[b] = torch.where(mask[b].bool(), rows[b] + pad, P - 1)
    return Chunk(embeds, compact_mask, rows_slots, rows, accounting)


def plain_chunk(model: nn.Module, input_ids: Tensor) -> Chunk:
    """A chunk of text tokens with no padding (decode steps): compact = input."""
    B, L = input_ids.shape
    arange = torch.arange(L, device=input_ids.device)
    return Chunk(model.get_input_embeddings()(input_ids), torch.ones_like(input_ids), [arange] * B,
                 arange.expand(B, L), [_row_accounting(L) for _ in range(B)])


def _row_accounting(text_tokens: int = 0) -> dict[str, Any]:
    return {"encoder_tokens": 0, "crop_tokens": [], "image_tokens": 0, "image_positions": 0, "text_tokens": text_tokens}


def virtual_block(chunk: Chunk, track: VTUTrack, first_row: int,
                  slot_rope: Optional[list[Tensor]] = None) -> VirtualLayout:
    """The chunk's virtual slots as a layout block: global compact rows (first_row + row),
    slot order continuing each row's sequence, left padding with invalid slots; slot_rope: per
    row, the (3, slots) M-RoPE positions of its slots (Qwen2-VL), else RoPE follows slot order."""
    B, device = len(chunk.slots), chunk.mask.device
    S = max(len(s) for s in chunk.slots)
    start = track.layout.next_positions() if track.layout.src.shape[1] else torch.zeros(B, dtype=torch.long,
                                                                                           device=device)
    src = torch.full((B, S), first_row, dtype=torch.long, device=device)
    pos = torch.zeros_like(src)
    valid = torch.zeros_like(src, dtype=torch.bool)
    rope = None if slot_rope is None else torch.zeros((3, B, S), dtype=torch.long, device=device)
    for b, slots in enumerate(chunk.slots):
        n = len(slots)
        src[b, S - n:] = first_row + slots
        pos[b, S - n:] = start[b] + torch.arange(n, device=device)
        valid[b, S - n:] = True
        if rope is not None:
            rope[:, b, S - n:] = slot_rope[b]
    return VirtualLayout(src, pos, valid, rope)


def chunk_rope(model: nn.Module, gen: GenerationState, chunk: Chunk, input_ids: Tensor, mask: Tensor,
               grids: dict[str, Optional[Tensor]], plain: bool) -> list[Tensor]:
    """Qwen2-VL: per row, the (3, slots) M-RoPE positions of the chunk's virtual slots (its valid
    input positions, numbered by HF's ``get_rope_index``, continuing where the row left off);
    advances ``gen.next_rope`` to one past each row's largest position."""
    B, L = input_ids.shape
    start = gen.next_rope if gen.next_rope is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
    if plain:  # decode steps: no padding, no images; no per-row indexing (no host syncs)
        gen.next_rope = start + L
        return list((start[:, None] + torch.arange(L, device=input_ids.device))[None].expand(3, B, L).unbind(1))
    rope = rope_positions(model, input_ids, mask, start, **grids)
    per_row = [rope[:, b, mask[b].bool()] for b in range(B)]
    for b, (r, slots) in enumerate(zip(per_row, chunk.slots)):
        if r.shape[1] != len(slots):
            raise ValueError(f"row {b}: {len(slots)} virtual slots but {r.shape[1]} input tokens; Qwen2-VL needs "
                             "every image's full run of placeholders (use the model's own processor)")
    gen.next_rope = torch.stack([r.amax() + 1 if r.numel() else s for r, s in zip(per_row, start)])
    return per_row


def compact_rope(chunk: Chunk, slot_rope: list[Tensor]) -> Tensor:
    """(3, B, P) M-RoPE position of every compact row of the chunk without VTU ("compact" and
    "full" modes): the position of its first virtual slot (with no merging, its own position:
    vanilla). Padding rows get 0."""
    B, P = chunk.mask.shape
    out = torch.zeros((3, B, P), dtype=torch.long, device=chunk.mask.device)
    for b, (slots, rope) in enumerate(zip(chunk.slots, slot_rope)):
        n = len(slots)
        first = torch.full((P,), n, dtype=torch.long, device=slots.device)
        first = first.scatter_reduce(0, slots, torch.arange(n, device=slots.device), reduce="amin")
        used = first < n
        out[:, b, used] = rope[:, first[used]].to(out.device)
    return out


def _output_class(model: nn.Module) -> type:
    base = classswap.base_class(model)
    module = sys.modules[base.__module__]
    name = base.__name__.replace("ForConditionalGeneration", "CausalLMOutputWithPast")
    return getattr(module, name, None) or module.CausalLMOutputWithPast  # Qwen2-VL uses the plain class


def _gather_positions(x: Tensor, rows: Tensor) -> Tensor:
    """(B, P, D) compact rows -> (B, L, D) at the input positions ``rows`` (B, L)."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


UNSUPPORTED = {"mm_encoder_outputs": "precomputed mm_encoder_outputs: DyMU must run the vision tower itself",
               "inputs_embeds": "inputs_embeds: DyMU finds the image placeholders in input_ids"}


def vlm_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a DyMU-patched LLaVA model (same signature and outputs as the model's own)."""
    state: VLMState = self.__dict__["dymu_vlm"]
    bound = inspect.signature(classswap.base_class(self).forward).bind(self, *args, **kwargs)
    a = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
    for name, why in UNSUPPORTED.items():
        if a.get(name) is not None:
            raise NotImplementedError(f"DyMU does not support {why}")
    videos_in = a.get("pixel_values_videos")
    if videos_in is not None and not is_qwen(self):
        raise NotImplementedError("DyMU does not support OneVision video inputs (pixel_values_videos) yet: OneVision "
                                  "pools its frames 2 x 2 before the LLM, which is not reproduced exactly")
    if a.get("output_attentions"):
        raise NotImplementedError("DyMU does not return attention weights (VTU attends over virtual copies)")
    for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
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
    cache = a.get("past_key_values")
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
    pixel_values = a.get("pixel_values")
    images = [] if pixel_values is None else _images_of(self)(
        self, pixel_values, image_sizes=a.get("image_sizes"), batch_num_images=a.get("batch_num_images"),
        image_grid_thw=a.get("image_grid_thw"), thresholds=state.unit_thresholds, metric=state.unit_metric,
        window=state.window)
    videos = [] if videos_in is None else qwen_images(self, videos_in, a.get("video_grid_thw"), state.unit_thresholds,
                                                      video=True, metric=state.unit_metric, temporal=state.temporal,
                                                      window=state.window)
    # In a later call of a generation (a cache holds the prompt) placeholders that come with no
    # pixels are ordinary tokens, as in vanilla HF (a model may generate one); in a prompt they
    # mean a missing image, an error.
    continuing = gen.n_compact > 0
    placeholders_are_text = pixel_values is None and continuing
    plain = pixel_values is None and videos_in is None and bool(mask.all()) and \
        (placeholders_are_text or not bool((input_ids == self.config.image_token_id).any()))
    chunk = plain_chunk(self, input_ids) if plain else \
        compact_chunk(self, input_ids, mask, None if placeholders_are_text else images, videos)

    first_row, P = gen.n_compact, chunk.mask.shape[1]
    gen.compact_mask = torch.cat([gen.compact_mask, chunk.mask], 1)
    gen.offset += L - P
    grids = {k: a.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    slot_rope = chunk_rope(self, gen, chunk, input_ids, mask, grids, plain) \
        if is_qwen(self) else None
    if state.mode == "vtu":
        if gen.track is None:
            empty = torch.zeros((B, 0), dtype=torch.long, device=device)
            gen.track = VTUTrack(VirtualLayout(empty, empty, empty.bool()), 0)
        gen.track.append(virtual_block(chunk, gen.track, first_row, slot_rope), P)
        find_decoder(self.model.language_model).dymu_vtu.track = gen.track
    if slot_rope is not None and state.mode != "vtu":
        position_ids = compact_rope(chunk, slot_rope)  # (3, B, P) M-RoPE positions
    else:
        position_ids = (gen.compact_mask.cumsum(-1) - 1).clamp_min(0)[:, -P:]  # consecutive (VTU ignores them)

    out = self.model.language_model(inputs_embeds=chunk.embeds, attention_mask=gen.compact_mask,
                                    position_ids=position_ids, past_key_values=cache, use_cache=use_cache,
                                    output_hidden_states=a.get("output_hidden_states"))
    if L > 1 or images:
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
    result = _output_class(self)(loss=loss, logits=logits, past_key_values=cache if use_cache else None,
                                 hidden_states=hidden)
    return result if a.get("return_dict", True) is not False else result.to_tuple()


def _runs_its_own_vision(self: nn.Module) -> bool:
    """generate would encode the images with the unpatched tower before the first forward; a
    patched model encodes them itself (DToMe), from pixel_values."""
    return False


# Per-item inputs generate must expand per sample: (placeholder token attribute, pixel key, grid
# key, other per-item keys). Qwen2-VL's pixel values are patches: t * h * w rows per item.
PER_ITEM = (("image_token_id", "pixel_values", "image_grid_thw", ("image_sizes",)),
            ("video_token_id", "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)))


def _items_per_sample(model: nn.Module, input_ids: Tensor, token: int, pixels: Tensor,
                      grids: Optional[Tensor]) -> list[int]:
    """How many items (images or videos) each prompt row holds: the items, in order, whose
    placeholders fill the row (Qwen2-VL: t * h * w / merge^2 each; LLaVA-1.5: all images alike,
    so adjacent images' placeholder runs need not be told apart)."""
    per_row = (input_ids == token).sum(-1).tolist()
    if grids is not None:
        sizes = (grids.prod(-1) // model.config.vision_config.spatial_merge_size ** 2).tolist()
    else:
        sizes = [sum(per_row) // max(len(pixels), 1)] * len(pixels)
    counts, taken = [], 0
    for need in per_row:
        first = taken
        while need > 0 and taken < len(sizes):
            need, taken = need - sizes[taken], taken + 1
        counts.append(taken - first)
    return counts


def _expand_per_sample(self: nn.Module, expand_size: int = 1, is_encoder_decoder: bool = False,
                       input_ids: Optional[Tensor] = None, **model_kwargs: Any) -> tuple[Tensor, dict[str, Any]]:
    """generate's batch expansion (beam search, num_return_sequences) repeats every tensor row by
    row. Image and video tensors are per item (Qwen2-VL's: per patch), not per sample, so they
    are repeated here per sample, each sample's items together, as the expanded prompts need
    them; the rest expands as usual. OneVision says its images per sample (batch_num_images)."""
    base = classswap.base_class(self)._expand_inputs_for_generation
    expanded: dict[str, Any] = {}
    for token_name, pixel_key, grid_key, extra_keys in PER_ITEM:
        items = {k: model_kwargs.pop(k) for k in (pixel_key, grid_key, *extra_keys) if model_kwargs.get(k) is not None}
        if pixel_key not in items or input_ids is None or expand_size == 1:
            expanded.update(items)
            continue
        grids = items.get(grid_key)
        if pixel_key == "pixel_values" and model_kwargs.get("batch_num_images") is not None:  # OneVision
            counts = [int(n) for n in model_kwargs["batch_num_images"]]
        else:
            counts = _items_per_sample(self, input_ids, getattr(self.config, token_name), items[pixel_key], grids)
        first = torch.tensor([0] + counts[:-1]).cumsum(0).tolist()
        order = [i for f, n in zip(first, counts) for _ in range(expand_size) for i in range(f, f + n)]
        for key, value in items.items():
            if key == pixel_key and grids is not None:  # Qwen2-VL: patch rows, t * h * w per item
                chunks = value.split(grids.prod(-1).tolist())
                expanded[key] = torch.cat([chunks[i] for i in order])
            else:
                expanded[key] = value[torch.tensor(order, device=value.device)]
    input_ids, model_kwargs = base(self, expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                   input_ids=input_ids, **model_kwargs)
    return input_ids, {**model_kwargs, **expanded}


classswap.register("vlm", vlm_forward, _supports_mm_encoder_outputs=_runs_its_own_vision,
                   _expand_inputs_for_generation=_expand_per_sample)


def _account(state: VLMState, gen: GenerationState, chunk: Chunk) -> None:
    compact = gen.compact_mask.sum(-1).tolist()
    virtual = gen.track.layout.valid.sum(-1).tolist() if gen.track is not None else compact
    state.last = [{**acc, "llm_compact_length": c, "llm_virtual_length": v}
                  for acc, c, v in zip(chunk.accounting, compact, virtual)]
    state.prompt_entries = gen.n_compact


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
    cache = getattr(out, "past_key_values", None)
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


def chat(model: nn.Module, processor: Any, images: list[Any], questions: list[str],
         **generate_kwargs: Any) -> GenerateOutput:
    """Plain questions in, answers out: each question with its images (None, one image, or a
    list) goes through the processor's chat template, then the processor and ``generate``."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} image entries but {len(questions)} questions; give one entry per question "
                         "(None, an image, or a list of images)")
    per_question = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(ims) + [{"type": "text", "text": q}]}],
        add_generation_prompt=True) for ims, q in zip(per_question, questions)]
    # nested per question, so that OneVision's processor counts each sample's images (batch_num_images)
    nested = per_question if all(per_question) else [im for ims in per_question for im in ims] or None
    inputs = processor(images=nested, text=prompts, return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    out = generate(model, **inputs, **generate_kwargs)
    out.texts = processor.batch_decode(out.sequences, skip_special_tokens=True)
    return out
