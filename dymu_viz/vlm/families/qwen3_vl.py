"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and the MoE class): DToMe rounds after the
PatchMerger as for Qwen2.5-VL (``qwen2_vl``), with what Qwen3-VL adds.

* The tower has no window attention: every block attends over the whole image, so the rounds'
  "keys" metric reads the last block (``qwen2_vl.full_attention_blocks``); its position
  embeddings are learned and interpolated per grid, inside HF's own tower, which runs as it is.
* **DeepStack**: the tower also returns, per unit, the features of a few intermediate blocks,
  which the LLM adds to its first layers' hidden states at the image positions. They travel
  with their units through the rounds (``qwen2_vl.with_deepstack``), so every compact token
  carries the size-weighted mean of its units' DeepStack features, and the LLM adds them at the
  compact rows (``llm_arguments``). Under VTU an addition to a compact row is the same addition
  to every virtual copy of it, so this is the virtual computation.
* Interleaved M-RoPE: the positions are HF's own ``get_rope_index``; the rotary embedding,
  interleaving included, runs on them unchanged.

* Videos: the processor writes each frame's placeholders as a run of their own, after a textual
  timestamp; a video's compact tokens are laid out over those runs (each joins the sequence at
  its first frame), and ``temporal=`` merges across frames as for Qwen2.5-VL.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from ..chunk import Chunk
from ..family import VisualInput, VLMSpec, register
from ..standin import (CHATML_ROLES, CHATML_SPECIALS, answer_in_words, build_tokenizer, scaled_llm_note,
                       scaled_text_config, tower_blocks)
from .qwen2_vl import CHAT_TEMPLATE, IMAGE_UNITS, Qwen2VL

VIDEO_FRAMES = VisualInput("video", "video_token_id", "pixel_values_videos", "video_grid_thw", spans_runs=True)

QWEN3_VIT_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                    spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
QWEN3_VIT_2B = dict(QWEN3_VIT_8B, depth=24, hidden_size=1024, intermediate_size=4096, deepstack_visual_indexes=[5, 11, 17])


def standin_processor(patch: int = 16, min_pixels: int = 32 * 32 * 4,
                      max_pixels: int = 32 * 32 * 1280) -> Any:
    """``Qwen3VLProcessor`` with HF's own image and video processors (2 x 2 units of ``patch`` px
    patches, dynamic resolution between min_pixels and max_pixels) and the stand-in tokenizer
    with Qwen's vision tokens (random-init models only)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    images = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2,
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    videos = Qwen3VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    tokenizer = build_tokenizer(CHATML_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                  "im_start": "<|im_start|>", "vision_start": "<|vision_start|>",
                                                  "vision_end": "<|vision_end|>"}, CHATML_ROLES)
    return Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                            chat_template=CHAT_TEMPLATE)


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: Qwen2.5-VL's rounds, metrics and M-RoPE handling, plus DeepStack."""

    name = "qwen3_vl"
    title = "Qwen3-VL"
    classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    inputs = (IMAGE_UNITS, VIDEO_FRAMES)
    lmms_name = "dymu_qwen3_vl"
    lmms_class = "DyMUQwen3VL"
    default_pretrained = "Qwen/Qwen3-VL-8B-Instruct"
    lmms_system_prompt = "You are a helpful assistant."  # lmms-eval's own qwen3_vl writes it
    lmms_processor_resizes = False  # theirs hands the processor resized pictures (do_resize=False)
    checkpoints = {
        "Qwen/Qwen3-VL-8B-Instruct": VLMSpec("qwen3", "Qwen3-VL ViT (27 x 1152, DeepStack 8/16/24)", QWEN3_VIT_8B,
                                             "Qwen3-8B", (36, 4096, 151936), {}),
        "Qwen/Qwen3-VL-2B-Instruct": VLMSpec("qwen3", "Qwen3-VL ViT (24 x 1024, DeepStack 5/11/17)", QWEN3_VIT_2B,
                                             "Qwen3-1.7B", (28, 2048, 151936), {})}
    model_types = {"qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

    def llm_arguments(self, chunk: Chunk) -> dict[str, Any]:
        """DeepStack: the image rows of the compact chunk and, per level, their merged features in
        the rows' order (the text model adds level l after its layer l)."""
        if chunk.extras is None:
            return {}
        rows = chunk.extras[chunk.visual]  # (visual rows, k, D), batch-major as HF's mask orders them
        return {"visual_pos_masks": chunk.visual, "deepstack_visual_embeds": list(rows.unbind(1))}

    def build_random(self, spec: VLMSpec, vision_layers: Optional[int], text_layers: int,
                     text_width: int) -> tuple[nn.Module, Any, str]:
        """The real ViT (its first ``vision_layers`` blocks; DeepStack reads those of its levels
        that remain, at least the last block), an LLM scaled down with the interleaved M-RoPE
        sections scaled to its head dim (the real [24, 20, 20] of 128)."""
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        processor = standin_processor(spec.vision["patch_size"])
        tok = processor.tokenizer
        depth = spec.vision["depth"]
        blocks = tower_blocks(vision_layers, depth, spec.tower)
        levels = [i for i in spec.vision["deepstack_visual_indexes"] if i < blocks] or [blocks - 1]
        vision = dict(spec.vision, depth=blocks, deepstack_visual_indexes=levels, out_hidden_size=text_width)
        half = 32  # head dim 64
        sections = [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]
        text = scaled_text_config(tok, text_layers, text_width, num_key_value_heads=max(1, text_width // 128),
                                  head_dim=64, max_position_embeddings=32768,
                                  rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                   "mrope_section": sections, "mrope_interleaved": True})
        ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=vision, text_config=text, **ids))
        answer_in_words(model, tok)
        note = (f"{type(model).__name__} with the {spec.tower} at its real width ({blocks} of its {depth} blocks x "
                f"{spec.vision['hidden_size']}, patch {spec.vision['patch_size']}, 2 x 2 units, DeepStack after "
                f"blocks {levels}) and {scaled_llm_note(spec.llm, spec.llm_shape, text_layers, text_width, len(tok))}")
        return model, processor, note


register(Qwen3VL())
