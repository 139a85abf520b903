"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one 336 px crop per image through the DToMe
CLIP tower, read one block early (``vision_feature_layer``); the virtual image is its patch grid."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ..family import VisualInput, VLMSpec, register
from ..standin import (CLIP_MEAN, CLIP_STD, answer_in_words, build_tokenizer, scaled_llm_note, scaled_text_config,
                       tower_blocks)
from ..tokens import ImageTokens
from ..tower import TowerFamily, TowerSettings, tower_features


def llava_images(model: nn.Module, pixel_values: Tensor, reduction: Any = None, **kwargs: Any) -> list[ImageTokens]:
    """LLaVA-1.5: one image, one tower pass; the virtual image is its patch grid. reduction: a
    baseline on the tower's output (``tower_features``)."""
    if pixel_values.dim() != 4:
        raise ValueError(f"LLaVA pixel_values must be (images, 3, H, W), got {tuple(pixel_values.shape)}")
    return [ImageTokens(f, m, [len(f)]).in_slot_order() for f, m in tower_features(model, pixel_values, reduction)]


# The stand-in's chat template, written after the real processor's prompt format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def standin_tokenizer() -> Any:
    """Llama's special tokens (BOS ``<s>`` before every text) and the ``<image>`` placeholder."""
    return build_tokenizer(dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"),
                           {"image_token": "<image>"}, ["user", "assistant"], bos=True)


def standin_processor(size: int, patch: int, select_strategy: str) -> Any:
    """``LlavaProcessor`` with HF's CLIP image processor at ``size`` px and the stand-in
    tokenizer (random-init models only; see ``dymu_viz.vlm.standin``)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return LlavaProcessor(image_processor=images, tokenizer=standin_tokenizer(), patch_size=patch,
                          image_token="<image>", vision_feature_select_strategy=select_strategy,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def tower_note(spec: VLMSpec, vision: dict[str, Any]) -> str:
    """A random ViT tower's shape, said plainly: its real shape, or its width at fewer layers."""
    depth, blocks = spec.vision["num_hidden_layers"], vision["num_hidden_layers"]
    layers = f"{depth} layers" if blocks == depth else f"{blocks} of its {depth} layers"
    return (f"the {spec.tower} tower at its real {'shape' if blocks == depth else 'width'} ({layers} x "
            f"{vision['hidden_size']}, {vision['image_size']} px, patch {vision['patch_size']})")


class Llava(TowerFamily):
    name = "llava"
    title = "LLaVA-1.5"
    classes = ("LlavaForConditionalGeneration",)
    config_arguments = ("vision_feature_layer", "vision_feature_select_strategy")
    lmms_name = "dymu_llava"
    lmms_class = "DyMULlava"
    default_pretrained = "llava-hf/llava-1.5-7b-hf"
    presets = {"low": "ViT-L-14-336-tome-72out"}  # the paper's DyMU-low for LLaVA-1.5 (dymu-spec section 3.4)
    checkpoints = {"llava-hf/llava-1.5-7b-hf": VLMSpec(
        "llava", "CLIP ViT-L/14-336", CLIP_L_336, "Llama-7B", (32, 4096, 32064),
        dict(vision_feature_layer=-2, vision_feature_select_strategy="default"))}
    model_types = {"llava": "LlavaForConditionalGeneration"}

    def build_random(self, spec: VLMSpec, vision_layers: Optional[int], text_layers: int,
                     text_width: int) -> tuple[nn.Module, Any, str]:
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        processor = standin_processor(spec.vision["image_size"], spec.vision["patch_size"],
                                      spec.settings["vision_feature_select_strategy"])
        tok = processor.tokenizer
        vision = dict(spec.vision, num_hidden_layers=tower_blocks(vision_layers, spec.vision["num_hidden_layers"],
                                                                   f"{spec.tower} tower"))
        text = scaled_text_config(tok, text_layers, text_width, max_position_embeddings=4096)
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(
            **text, num_key_value_heads=text["num_attention_heads"]),
            image_token_id=tok.convert_tokens_to_ids("<image>"), **spec.settings)
        model = LlavaForConditionalGeneration(config)
        answer_in_words(model, tok)
        note = (f"{type(model).__name__} with {tower_note(spec, vision)} and "
                f"{scaled_llm_note(spec.llm, spec.llm_shape, text_layers, text_width, len(tok))}")
        return model, processor, note

    def encode(self, model: nn.Module, settings: TowerSettings, visual: VisualInput,
               arguments: dict[str, Any]) -> list[ImageTokens]:
        return llava_images(model, arguments[visual.pixels], settings.reduction)


register(Llava())
