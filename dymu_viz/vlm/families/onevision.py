"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): AnyRes crops through the
batched DToMe tower, and the *vanilla* OneVision layout (base crop, then the unpadded tile grid
with a newline token after every row) as the virtual sequence.

The layout is obtained by running HF's own ``pack_image_features`` on compact-row *indices*
instead of features: reshaping, unpadding and flattening only move entries, so every virtual
slot comes out holding the compact row it copies, and newline slots come out as -1. Each newline
becomes its own compact token. Compact rows that no slot copies (tokens of the padding that
unpadding removes) are dropped. With no merging this reproduces vanilla OneVision exactly.

Large images: when the unpadded grid exceeds ``anyres_max_N`` tiles' worth of tokens, OneVision
shrinks it with bilinear interpolation, so a slot can blend up to four grid tokens. The index
pass carries a second channel, index², and a slot whose blend has zero variance copies a single
compact row as above. A slot that blends *different* compact rows (it straddles a group border)
becomes a compact token of its own, holding exactly the feature vanilla OneVision computes from
the merged tower's output. So the layout stays exact -- with no merging it is vanilla OneVision --
and the cost is one extra compact token per border-straddling slot.

Videos: OneVision runs each frame through the tower and the projector, shrinks its grid 2 x 2 by
bilinear interpolation (``apply_pooling``) and ends the video with one newline token. The same
index pass runs HF's own pooling on compact-row indices: a pooled slot whose sources all copy
one merged token copies it, a slot blending different merged tokens becomes a token of its own
holding vanilla's blend, and the newline is a token of its own. With no merging every pooled
slot blends four patches, so the video is vanilla OneVision's, token for token.

Images per prompt: as in HF, an image of a prompt with several images is its base crop only (no
AnyRes tiles). ``batch_num_images`` says how many each prompt holds when the processor got the
images nested per prompt; given a flat list it says 1 per image (every image tiled).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...thresholds import Thresholds
from ..family import IMAGES, VisualInput, VLMSpec, register
from ..standin import (CHATML_ROLES, CHATML_SPECIALS, answer_in_words, build_tokenizer, scaled_llm_note,
                       scaled_text_config, tower_blocks)
from .llava import tower_note
from ..tokens import ImageTokens
from ..tower import OutputReduction, TowerFamily, TowerSettings, tower_features

NEWLINE = -1.0
MIXED = 1e-6  # index variance above which a downsampled slot blends different compact rows
VIDEOS = VisualInput("video", "video_token_id", "pixel_values_videos")


def tiled_flags(batch_num_images: Optional[Tensor], n_images: int) -> list[bool]:
    """Per image, whether it goes in with its AnyRes tiles: as in HF, when its prompt holds it
    alone (``batch_num_images``: images per prompt, or 1 per image for a flat list)."""
    tiled = [True] * n_images if batch_num_images is None else \
        [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    if len(tiled) != n_images:
        raise ValueError(f"batch_num_images counts {len(tiled)} images but image_sizes has {n_images}")
    return tiled


def crop_counts(model: nn.Module, image_sizes: Tensor, tiled: list[bool]) -> list[int]:
    """Crops per image: base crop and tiles when tiled, else the base crop alone."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    cfg = model.config
    return [image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if tile else 1
            for size, tile in zip(image_sizes, tiled)]


def onevision_images(model: nn.Module, pixel_values: Tensor, image_sizes: Optional[Tensor] = None,
                     batch_num_images: Optional[Tensor] = None, reduction: Optional[OutputReduction] = None,
                     **kwargs: Any) -> list[ImageTokens]:
    """Per image: compact features (n, D) -- every crop's merged tokens, one token per newline and
    one per blended slot -- and the mapping (V_img,) from each vanilla-layout position to its
    compact row. batch_num_images: see the module docstring; reduction: a baseline on the
    tower's output (``tower_features``)."""
    if image_sizes is None:
        raise ValueError("LLaVA-OneVision needs image_sizes (the original (H, W) of every image)")
    n_crops = crop_counts(model, image_sizes, tiled_flags(batch_num_images, len(image_sizes)))
    if pixel_values.dim() != 5:
        raise ValueError(f"LLaVA-OneVision pixel_values must be (images, crops, 3, H, W), got {tuple(pixel_values.shape)}")
    crops = torch.cat([pix[:n] for pix, n in zip(pixel_values, n_crops)])
    per_crop = tower_features(model, crops, reduction)
    out, first = [], 0
    for i, n in enumerate(n_crops):
        segments = per_crop[first:first + n]
        first += n
        feats, grid = crop_grid(segments)
        layout = partial(pack, model, image_size=image_sizes[i])
        out.append(slot_tokens(feats, grid, layout, model.model.image_newline, [len(f) for f, _ in segments]))
    return out


def slot_tokens(feats: Tensor, grid: Tensor, layout: Any, newline: Tensor, tower_rows: list[int]) -> ImageTokens:
    """One item's compact tokens from its crops' (frames') compact rows ``grid`` (crops, positions)
    into ``feats`` (n, D), ``layout`` being vanilla's map from a (crops, positions, C) grid and a
    newline vector to the item's slots (C channels, any dtype). A slot that copies one row maps
    to it; a newline slot, and a slot blending different rows, gets a token of its own (vanilla's
    value there); rows no slot copies are dropped. ``tower_rows``: each crop's tower tokens."""
    powers = torch.tensor([1.0, 2.0], dtype=torch.float64, device=grid.device)
    newline_index = torch.tensor([NEWLINE, NEWLINE ** 2], dtype=torch.float64, device=grid.device)
    slots = layout(grid.to(torch.float64)[..., None] ** powers, newline=newline_index)  # (slots, 2): index, index^2
    index, variance = slots[:, 0], slots[:, 1] - slots[:, 0] ** 2
    mixed = variance > MIXED
    own = (index == NEWLINE) | mixed  # slots that get a compact token of their own, in slot order
    if mixed.any():  # a blend of different rows: vanilla's value, as it is
        extra = layout(feats[grid], newline=newline.to(feats.dtype))[own]
    else:
        extra = newline.to(feats.dtype)[None].expand(int(own.sum()), -1)
    mapping = index.round().long()
    mapping[own] = len(feats) + torch.arange(int(own.sum()), device=mapping.device)
    used, mapping = torch.unique(mapping, return_inverse=True)  # drop rows no slot copies (unpadded away)
    return ImageTokens(torch.cat([feats, extra])[used], mapping, tower_rows).in_slot_order()


def crop_grid(segments: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Crops' (frames') ``tower_features`` as one item: their compact rows stacked (n, D) and
    each crop's positions' rows into them (crops, positions)."""
    feats = torch.cat([f for f, _ in segments])
    offsets = torch.tensor([0] + [len(f) for f, _ in segments[:-1]], device=feats.device).cumsum(0)
    return feats, torch.stack([m + o for (_, m), o in zip(segments, offsets)])


def onevision_videos(model: nn.Module, pixel_values_videos: Tensor, reduction: Optional[OutputReduction] = None
                     ) -> list[ImageTokens]:
    """Per video (videos, frames, 3, H, W): its frames' merged tokens, pooled 2 x 2 as vanilla
    OneVision pools them, then its newline (see the module docstring)."""
    if pixel_values_videos.dim() != 5:
        raise ValueError("LLaVA-OneVision pixel_values_videos must be (videos, frames, 3, H, W), got "
                         f"{tuple(pixel_values_videos.shape)}")
    videos, frames = pixel_values_videos.shape[:2]
    per_frame = tower_features(model, pixel_values_videos.flatten(0, 1), reduction)

    def layout(grid: Tensor, newline: Tensor) -> Tensor:
        """Vanilla's video slots: every frame's grid pooled by HF's ``apply_pooling``, then the newline."""
        return torch.cat([model.model.apply_pooling(grid).flatten(0, 1), newline[None]])

    out = []
    for v in range(videos):
        segments = per_frame[v * frames:(v + 1) * frames]
        feats, grid = crop_grid(segments)
        out.append(slot_tokens(feats, grid, layout, model.model.image_newline, [len(f) for f, _ in segments]))
    return out


def pack(model: nn.Module, grid: Tensor, image_size: Tensor, newline: Tensor) -> Tensor:
    """HF's vanilla packing of one image's crops (crops, positions, C) -> (slots, C)."""
    packed, _ = model.model.pack_image_features([grid], image_size[None], image_newline=newline,
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0]


def layout_lengths(model: nn.Module, image_sizes: Tensor, batch_num_images: Optional[Tensor]) -> list[int]:
    """The vanilla layout's length of every image (its placeholders), from the sizes alone:
    HF's packing run on a one-channel grid of zeros."""
    vision = model.config.vision_config
    positions = (vision.image_size // vision.patch_size) ** 2
    tiled = tiled_flags(batch_num_images, len(image_sizes))
    zero = torch.zeros(1, dtype=torch.float64, device=image_sizes.device)
    return [len(pack(model, zero.new_zeros((n, positions, 1)), size, zero))
            for n, size in zip(crop_counts(model, image_sizes, tiled), image_sizes)]


# The stand-in's chat template (ChatML), written after the real processor's prompt format: a
# sample's images adjacent, <image><image>, then its videos, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'video' %}{{ '<video>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def standin_processor(size: int, patch: int, select_strategy: str, pinpoints: list[list[int]],
                      aspect_ratio: Optional[str]) -> Any:
    """``LlavaOnevisionProcessor`` with HF's own image and video processors at ``size`` px and the
    stand-in tokenizer (random-init models only; see ``dymu_viz.vlm.standin``)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = LlavaOnevisionImageProcessor(size={"height": size, "width": size}, **norm, image_grid_pinpoints=pinpoints)
    videos = LlavaOnevisionVideoProcessor(size={"height": size, "width": size}, **norm)
    tokenizer = build_tokenizer(CHATML_SPECIALS, {"image_token": "<image>", "video_token": "<video>",
                                                  "im_start": "<|im_start|>"}, CHATML_ROLES)
    return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                   num_image_tokens=(size // patch) ** 2,
                                   vision_feature_select_strategy=select_strategy, vision_aspect_ratio=aspect_ratio,
                                   chat_template=CHAT_TEMPLATE)


ANYRES_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]
SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                         image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
SETTINGS = dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                image_grid_pinpoints=ANYRES_PINPOINTS)


class OneVision(TowerFamily):
    name = "onevision"
    # unpadding drops the kept tokens that fall in an image's padding: which ones depends on the pixels
    baseline_counts_by_size = False
    title = "LLaVA-OneVision"
    classes = ("LlavaOnevisionForConditionalGeneration",)
    inputs = (IMAGES, VIDEOS)
    placeholders = {"image": "<image>", "video": "<video>"}
    config_arguments = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio")
    lmms_name = "dymu_llava_onevision"
    lmms_class = "DyMULlavaOneVision"
    default_pretrained = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    checkpoints = {
        "llava-hf/llava-onevision-qwen2-7b-ov-hf": VLMSpec(
            "onevision", "SigLIP so400m-patch14-384", SIGLIP_SO400M_384, "Qwen2-7B", (28, 3584, 152128), SETTINGS),
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": VLMSpec(
            "onevision", "SigLIP so400m-patch14-384", SIGLIP_SO400M_384, "Qwen2-0.5B", (24, 896, 151936), SETTINGS)}
    model_types = {"llava_onevision": "LlavaOnevisionForConditionalGeneration"}

    def build_random(self, spec: VLMSpec, vision_layers: Optional[int], text_layers: int,
                     text_width: int) -> tuple[nn.Module, Any, str]:
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                                  SiglipVisionConfig)

        processor = standin_processor(spec.vision["image_size"], spec.vision["patch_size"],
                                      spec.settings["vision_feature_select_strategy"],
                                      spec.settings["image_grid_pinpoints"], spec.settings["vision_aspect_ratio"])
        tok = processor.tokenizer
        vision = dict(spec.vision, num_hidden_layers=tower_blocks(vision_layers, spec.vision["num_hidden_layers"],
                                                                   f"{spec.tower} tower"))
        text = scaled_text_config(tok, text_layers, text_width, max_position_embeddings=32768, rope_theta=1e6)
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(
            **text, num_key_value_heads=max(1, text["num_attention_heads"] // 2)),
            video_token_id=tok.convert_tokens_to_ids("<video>"), image_token_id=tok.convert_tokens_to_ids("<image>"),
            **spec.settings)
        model = LlavaOnevisionForConditionalGeneration(config)
        answer_in_words(model, tok)
        note = (f"{type(model).__name__} with {tower_note(spec, vision)} and "
                f"{scaled_llm_note(spec.llm, spec.llm_shape, text_layers, text_width, len(tok))}")
        return model, processor, note

    def tower_thresholds(self, model: nn.Module, thresholds: Any) -> Any:
        """LLaVA-OneVision's tower is SO400M with its last layer deleted (26 of 27 layers), and the
        reference's SO400M threshold files have 27 values, of which its tower uses the first 26. Such
        a file is mapped the same way here, with a warning that says so; any other depth mismatch
        stays an error (raised by ``patch``)."""
        if thresholds is None or isinstance(thresholds, (int, float)):
            return thresholds
        depth = model.config.vision_config.num_hidden_layers
        if len(thresholds.values if isinstance(thresholds, Thresholds) else thresholds) != depth + 1:
            return thresholds
        warnings.warn(f"{depth + 1}-layer thresholds on LLaVA-OneVision's {depth}-layer tower: layers 0-{depth - 1} "
                      f"are used and the last threshold is not, as in the reference (its tower drops SO400M's last "
                      f"layer too); pass thresholds.truncated({depth}) to map it yourself", stacklevel=4)
        return thresholds.truncated(depth) if isinstance(thresholds, Thresholds) else list(thresholds)[:depth]

    def encode(self, model: nn.Module, settings: TowerSettings, visual: VisualInput,
               arguments: dict[str, Any]) -> list[ImageTokens]:
        if visual.kind == "video":
            return onevision_videos(model, arguments[visual.pixels], settings.reduction)
        return onevision_images(model, arguments[visual.pixels], arguments.get("image_sizes"),
                                arguments.get("batch_num_images"), settings.reduction)

    def item_lengths(self, model: nn.Module, visual: VisualInput, arguments: dict[str, Any]) -> list[int]:
        if visual.kind == "video":
            return super().item_lengths(model, visual, arguments)
        return layout_lengths(model, arguments["image_sizes"], arguments.get("batch_num_images"))


register(OneVision())
