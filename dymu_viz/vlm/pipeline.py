"""DyMU in HF LLaVA models: DToMe in the vision tower, compact image features spliced where
the image placeholders are, VTU in the RoPE decoder.

    dymu_viz.vlm.patch_vlm(model, thresholds)            # DToMe + VTU (mode="vtu")
    out = dymu_viz.vlm.generate(model, input_ids, pixel_values, attention_mask, max_new_tokens=32)
    out.sequences, out.accounting                       # new tokens; per-sample token counts
    dymu_viz.vlm.unpatch_vlm(model)

Modes: "vtu" (the LLM runs as if the full-length image were there), "compact" (the paper's
"w/o VTU" ablation: compact tokens at consecutive positions), and "full" (no merging: equal to
the unpatched model).

Each model family supplies one function: images -> per image an ``ImageTokens``: compact
features (n, D), the mapping (V_img,) from every virtual image position to its compact row, and
the tokens the tower returned for each of its crops. ``input_ids`` may hold each
image as the processor expands it or as a single placeholder: either way the run of
placeholders is replaced by that image's compact tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..patch import encode, get_state, patch, unpatch
from ..thresholds import Thresholds
from ..vtu import VirtualLayout, cache_bytes, patch_llm, unpatch_llm

MODES = ("vtu", "compact", "full")


@dataclass
class VLMState:
    mode: str
    kernel: str


@dataclass
class PreparedInputs:
    """The compact LLM input. inputs_embeds: (B, P, D) left-padded; attention_mask: (B, P);
    layout: the virtual sequence (None in "compact" mode); accounting: one dict per sample:
    encoder_tokens (tower output, summed over crops) and crop_tokens (per crop); image_tokens
    (compact image rows in the LLM: for OneVision, the crop tokens its layout uses plus newline
    and blend tokens) and image_positions (virtual image length); llm_compact_length and
    llm_virtual_length (the positions the LLM attends over: the compact length in "compact" mode)."""

    inputs_embeds: Tensor
    attention_mask: Tensor
    layout: Optional[VirtualLayout]
    accounting: list[dict[str, Any]]


@dataclass
class GenerateOutput:
    sequences: Tensor  # (B, new tokens)
    accounting: list[dict[str, Any]]
    texts: Optional[list[str]] = None  # decoded new tokens (chat only)


@dataclass
class ImageTokens:
    """One image in the LLM: features (n, D) compact rows; mapping (V_img,) virtual image
    position -> compact row; crop_tokens: tokens the tower returned per crop (one crop for
    LLaVA-1.5; base crop then tiles for OneVision)."""

    features: Tensor
    mapping: Tensor
    crop_tokens: list[int]


ImageSegments = list[tuple[Tensor, Tensor]]


def _family(model: nn.Module) -> Callable[..., list[ImageTokens]]:
    from .onevision import onevision_images
    families = {"LlavaForConditionalGeneration": llava_images,
                "LlavaOnevisionForConditionalGeneration": onevision_images}
    if type(model).__name__ not in families:
        raise TypeError(f"expected one of {', '.join(families)}, got {type(model).__name__}")
    return families[type(model).__name__]


def patch_vlm(model: nn.Module, thresholds: Union[Thresholds, list[float], float, None] = None,
              mode: str = "vtu", kernel: str = "sdpa", backend: str = "native") -> nn.Module:
    """DToMe in the vision tower (thresholds None: no merging) and, in "vtu" mode, VTU in the LLM
    (kernel and scatter backend as in ``dymu_viz.vtu.patch_llm``)."""
    _family(model)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    patch(model.model.vision_tower, None if mode == "full" else onevision_tower_thresholds(model, thresholds))
    if mode == "vtu":
        patch_llm(model.model.language_model, kernel, backend)
    elif getattr(model.model.language_model, "dymu_vtu", None) is not None:
        unpatch_llm(model.model.language_model)
    model.dymu_vlm = VLMState(mode, kernel)
    return model


def onevision_tower_thresholds(model: nn.Module, thresholds: Any) -> Any:
    """LLaVA-OneVision's tower is SO400M with its last layer deleted (26 of 27 layers), and the
    reference's SO400M threshold files have 27 values, of which its tower uses the first 26. Such
    a file is mapped the same way here, with a warning that says so; any other depth mismatch
    stays an error (raised by ``patch``)."""
    if type(model).__name__ != "LlavaOnevisionForConditionalGeneration" or isinstance(thresholds, (int, float)):
        return thresholds
    depth = model.config.vision_config.num_hidden_layers
    if thresholds is None or len(thresholds.values if isinstance(thresholds, Thresholds) else thresholds) != depth + 1:
        return thresholds
    warnings.warn(f"{depth + 1}-layer thresholds on LLaVA-OneVision's {depth}-layer tower: layers 0-{depth - 1} are "
                  f"used and the last threshold is not, as in the reference (its tower drops SO400M's last layer "
                  f"too); pass thresholds.truncated({depth}) to map it yourself", stacklevel=3)
    return thresholds.truncated(depth) if isinstance(thresholds, Thresholds) else list(thresholds)[:depth]


def unpatch_vlm(model: nn.Module) -> nn.Module:
    """Undo patch_vlm."""
    state = model.__dict__.pop("dymu_vlm", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched by dymu_viz.vlm")
    unpatch(model.model.vision_tower)
    if getattr(model.model.language_model, "dymu_vtu", None) is not None:
        unpatch_llm(model.model.language_model)
    return model


def tower_features(model: nn.Module, pixels: Tensor) -> ImageSegments:
    """Per input image (or crop): (compact features (n, D) after the projector, mapping from
    each of its positions -- patches, plus CLS with the "full" strategy -- to its compact row).
    The DToMe tower runs batched, up to ``vision_feature_layer`` and no further."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError("DyMU supports a single vision_feature_layer")
    tower = model.model.vision_tower
    depth = get_state(tower).adapter.depth
    if not -depth - 1 <= layer <= depth:
        raise ValueError(f"vision_feature_layer {layer} does not exist in a {depth}-layer vision tower")
    blocks = layer % (depth + 1)  # hidden state `layer` is the output of this many blocks
    result = encode(tower, pixels.to(next(tower.parameters()).dtype), blocks=blocks)
    hidden, groups, sizes = result.tokens, result.groups, result.sizes  # the last block run is the one read
    first = 1 if cfg.vision_feature_select_strategy == "default" else 0  # "default" drops CLS
    projected = model.model.multi_modal_projector(hidden[:, first:])  # one batched call; padding rows unused
    counts = ((sizes > 0).sum(-1) - first).tolist()
    return [(projected[b, :n], groups[b, first:] - first) for b, n in enumerate(counts)]


def llava_images(model: nn.Module, pixel_values: Tensor, **kwargs: Any) -> list[ImageTokens]:
    """LLaVA-1.5: one image, one tower pass; the virtual image is its patch grid."""
    return [ImageTokens(f, m, [len(f)]) for f, m in tower_features(model, pixel_values)]


def prepare_inputs(model: nn.Module, input_ids: Tensor, pixel_values: Tensor,
                   attention_mask: Optional[Tensor] = None, **image_kwargs: Any) -> PreparedInputs:
    """Encode the images with DToMe and build the compact, left-padded LLM input and layout."""
    state: Optional[VLMState] = getattr(model, "dymu_vlm", None)
    if state is None:
        raise ValueError("call dymu_viz.vlm.patch_vlm(model, thresholds) first")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    image_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    features = _family(model)(model, pixel_values, **image_kwargs)
    runs = [_runs(row[m.bool()] == image_id) for row, m in zip(input_ids, attention_mask)]
    if sum(len(r) for r in runs) != len(features):
        raise ValueError(f"{len(features)} images given but the prompts hold {sum(len(r) for r in runs)} image "
                         "placeholder runs; give one image per placeholder (<image>)")
    sequences, mappings, accounting = [], [], []
    images = iter(features)
    for row, m, sample_runs in zip(input_ids, attention_mask, runs):
        tokens = row[m.bool()]
        parts, mapping, start, compact = [], [], 0, 0
        n_image_tokens = n_image_virtual = 0
        crop_tokens: list[int] = []
        for begin, end in sample_runs + [(len(tokens), len(tokens))]:
            text = tokens[start:begin]
            parts.append(embed(text))
            mapping.append(compact + torch.arange(len(text), device=row.device))
            compact += len(text)
            if begin < len(tokens):
                image = next(images)
                feats, image_map = image.features, image.mapping
                crop_tokens += image.crop_tokens
                parts.append(feats.to(parts[-1].dtype))
                mapping.append(compact + image_map.to(row.device))
                compact += len(feats)
                n_image_tokens += len(feats)
                n_image_virtual += len(image_map)
            start = end
        sequences.append(torch.cat(parts))
        mappings.append(torch.cat(mapping))
        accounting.append({"encoder_tokens": sum(crop_tokens), "crop_tokens": crop_tokens,
                           "image_tokens": n_image_tokens, "image_positions": n_image_virtual,
                           "llm_compact_length": compact,
                           "llm_virtual_length": compact if state.mode == "compact" else int(mappings[-1].numel())})
    P = max(len(s) for s in sequences)
    dim = sequences[0].shape[-1]
    embeds = sequences[0].new_zeros((len(sequences), P, dim))
    mask = torch.zeros((len(sequences), P), dtype=torch.long, device=input_ids.device)
    for b, s in enumerate(sequences):
        embeds[b, P - len(s):], mask[b, P - len(s):] = s, 1
        mappings[b] = mappings[b] + P - len(s)
    layout = VirtualLayout.from_mappings(mappings) if state.mode == "vtu" else None
    return PreparedInputs(embeds, mask, layout, accounting)


def _runs(flags: Tensor) -> list[tuple[int, int]]:
    """[begin, end) of every run of True in a 1-D bool tensor."""
    edges = torch.diff(torch.cat([flags.new_zeros(1), flags, flags.new_zeros(1)]).long())
    return list(zip(edges.eq(1).nonzero().squeeze(1).tolist(), edges.eq(-1).nonzero().squeeze(1).tolist()))


def _start_llm(model: nn.Module, prepared: PreparedInputs) -> None:
    vtu = getattr(model.model.language_model, "dymu_vtu", None)
    if vtu is not None:
        vtu.start(prepared.layout, prepared.inputs_embeds.shape[1])


def _positions(prepared: PreparedInputs) -> Tensor:
    """Position ids: consecutive from 0 at each sample's first token (VTU ignores them)."""
    return (prepared.attention_mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def logits(model: nn.Module, input_ids: Tensor, pixel_values: Tensor, attention_mask: Optional[Tensor] = None,
           **image_kwargs: Any) -> tuple[Tensor, PreparedInputs]:
    """Next-token logits at every compact position: (B, P, vocab), and the prepared inputs."""
    prepared = prepare_inputs(model, input_ids, pixel_values, attention_mask, **image_kwargs)
    _start_llm(model, prepared)
    out = model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                position_ids=_positions(prepared))
    return out.logits, prepared


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, pixel_values: Tensor, attention_mask: Optional[Tensor] = None,
             image_sizes: Optional[Tensor] = None, **generate_kwargs: Any) -> GenerateOutput:
    """Generate from images + prompts; per-sample accounting gains KV-cache entries and bytes.
    image_sizes: (n_images, 2) original (H, W), needed by LLaVA-OneVision's AnyRes layout."""
    image_kwargs = {} if image_sizes is None else {"image_sizes": image_sizes}
    prepared = prepare_inputs(model, input_ids, pixel_values, attention_mask, **image_kwargs)
    _start_llm(model, prepared)
    out = model.generate(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                         return_dict_in_generate=True, **generate_kwargs)
    new = out.sequences
    cache = getattr(out, "past_key_values", None)
    kv_len = cache.layers[0].keys.shape[2] if cache is not None and cache.layers else 0
    for acc in prepared.accounting:
        acc["generated_tokens"] = int(new.shape[1])
        acc["kv_cache_entries"] = acc["llm_compact_length"] + max(kv_len - prepared.inputs_embeds.shape[1], 0)
    if cache is not None:
        per_row = cache_bytes(cache) // max(new.shape[0], 1)
        for acc in prepared.accounting:
            acc["kv_cache_bytes_per_sample_padded"] = per_row
    return GenerateOutput(new, prepared.accounting)


def chat(model: nn.Module, processor: Any, images: list[Any], prompts: list[str], **generate_kwargs: Any) -> GenerateOutput:
    """Images + prompts in, generated text and per-sample accounting out. Preprocessing is the
    model's own HF processor (one image per prompt, marked with the processor's image token)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one image per prompt")
    device = next(model.parameters()).device
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    extra = {"image_sizes": inputs["image_sizes"].to(device)} if "image_sizes" in inputs else {}
    out = generate(model, inputs["input_ids"].to(device), inputs["pixel_values"].to(device),
                   inputs["attention_mask"].to(device), **extra, **generate_kwargs)
    out.texts = processor.batch_decode(out.sequences, skip_special_tokens=True)
    return out
