"""Tiny randomly initialised encoders of every supported family (no weights are
ever downloaded), synthetic test images, and helpers to collect a family's outputs.

Families (``FAMILIES``):
  hf_clip     HF CLIPVisionModel (CLS, pooler = post_layernorm(CLS))
  hf_siglip   HF SiglipVisionModel (no CLS, MAP attention-pool head)
  open_clip   open_clip's OpenAI-CLIP VisionTransformer (CLS, 'tok' pooling, projection)
  timm_map    timm VisionTransformer, SigLIP style (no CLS, global_pool='map')
  timm_cls    timm VisionTransformer with a CLS token and global_pool='token'
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

FAMILIES = ("hf_clip", "hf_siglip", "open_clip", "timm_map", "timm_cls")

# Shapes of the tiny VLMs (LLaVA-1.5, LLaVA-OneVision): a 56-pixel tower with 14-pixel patches
# (16 patches) and a 2-layer GQA decoder.
TINY_VLM_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                       image_size=56, patch_size=14)
TINY_VLM_TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=2)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _make_hf(kind: str, layers: int = 4, hidden: int = 64, heads: int = 4, image: int = 56, patch: int = 14,
             intermediate: int | None = None, seed: int = 0) -> nn.Module:
    import transformers
    prefix = {"clip": "CLIP", "siglip": "Siglip"}[kind]
    _seeded(seed)
    cfg = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image, patch_size=patch)
    return getattr(transformers, f"{prefix}VisionModel")(cfg).eval()


def make_hf_clip(**kwargs: Any) -> nn.Module:
    return _make_hf("clip", **kwargs)


def make_hf_siglip(**kwargs: Any) -> nn.Module:
    return _make_hf("siglip", **kwargs)


def make_open_clip(layers: int = 3, hidden: int = 64, heads: int = 4, image: int = 64, patch: int = 16,
                   output_tokens: bool = False, seed: int = 0) -> nn.Module:
    from open_clip.transformer import VisionTransformer
    _seeded(seed)
    return VisionTransformer(image_size=image, patch_size=patch, width=hidden, layers=layers, heads=heads,
                             mlp_ratio=4, output_dim=32, output_tokens=output_tokens).eval()


def make_timm_map(layers: int = 3, hidden: int = 64, heads: int = 4, image: int = 64, patch: int = 16,
                  seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    _seeded(seed)
    return VisionTransformer(img_size=image, patch_size=patch, embed_dim=hidden, depth=layers, num_heads=heads,
                             class_token=False, global_pool="map", no_embed_class=True, num_classes=0).eval()


def make_timm_cls(layers: int = 3, hidden: int = 64, heads: int = 4, image: int = 64, patch: int = 16,
                  seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    _seeded(seed)
    return VisionTransformer(img_size=image, patch_size=patch, embed_dim=hidden, depth=layers, num_heads=heads,
                             class_token=True, global_pool="token", num_classes=10).eval()


FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "hf_clip": make_hf_clip, "hf_siglip": make_hf_siglip, "open_clip": make_open_clip,
    "timm_map": make_timm_map, "timm_cls": make_timm_cls,
}

# (patches per image, protected leading tokens) for each family
PROTECTED = {"hf_clip": 1, "hf_siglip": 0, "open_clip": 1, "timm_map": 0, "timm_cls": 1}


def image_size(model: nn.Module) -> int:
    """Square input size the encoder expects."""
    if hasattr(model, "config"):  # HF
        return int(model.config.image_size)
    if hasattr(model, "patch_embed"):  # timm
        return int(model.patch_embed.img_size[0])
    return int(model.image_size[0])  # open_clip


def patch_size(model: nn.Module) -> int:
    if hasattr(model, "config"):
        return int(model.config.patch_size)
    if hasattr(model, "patch_embed"):
        return int(model.patch_embed.patch_size[0])
    return int(model.patch_size[0])


def zero_position_embedding(model: nn.Module) -> None:
    """Zero every positional embedding of the encoder (so equal patches give equal tokens)."""
    with torch.no_grad():
        if hasattr(model, "config"):  # HF CLIP / SigLIP: nn.Embedding
            getattr(model, "vision_model", model).embeddings.position_embedding.weight.zero_()
        elif hasattr(model, "patch_embed"):  # timm
            model.pos_embed.zero_()
        else:  # open_clip
            model.positional_embedding.zero_()


def redundancy_images(size: int, patch: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    """(4, 3, size, size): constant colour, pure noise, half constant / half noise, and a
    checkerboard of patch-sized squares -- four very different amounts of redundancy."""
    g = torch.Generator().manual_seed(seed)
    const = torch.tensor([0.3, -0.5, 0.8])[:, None, None].expand(3, size, size).clone()
    noise = torch.randn(3, size, size, generator=g)
    half = const.clone()
    half[:, size // 2:] = torch.randn(3, size - size // 2, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy // patch + xx // patch) % 2).to(torch.float32) * 2 - 1
    board = board.expand(3, size, size).clone()
    return torch.stack([const, noise, half, board]).to(dtype)


def family_outputs(family: str, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Call the model the way its users do and collect every output it returns."""
    if family in ("hf_clip", "hf_siglip"):
        out = model(pixel_values=x, output_hidden_states=True)
        tup = model(pixel_values=x, output_hidden_states=True, return_dict=False)
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output,
                "hidden_states": tuple(out.hidden_states), "tuple": tuple(tup)}
    out = model(x)
    if isinstance(out, tuple):  # open_clip with output_tokens=True
        return {"pooled": out[0], "tokens": out[1]}
    return {"out": out}


def flatten_outputs(outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                add(f"{name}[{i}]", v)
        elif value is not None:
            flat[name] = value

    for key, value in outputs.items():
        add(key, value)
    return flat




# Tiny LLaVA-1.5 / OneVision with a real HF processor (stand-in tokenizer): what users call.
VLM_QUESTIONS = ["what is in the picture ?", "describe the colors of this photo please", "is there a cat ?"]
TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def tiny_vlm(family: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0,
             vision_layers: int = 3, patch_size: int = 14) -> tuple[nn.Module, Any]:
    """(model, processor) for family "llava" or "onevision": a 56 px tower (16 patches of 14 px,
    64 of 7 px), a 2-layer GQA decoder, and a real HF processor whose stand-in tokenizer sizes
    the vocabulary."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)
    from dymu_viz.vlm.families import llava as llava_family, onevision

    llava = family == "llava"
    processor = llava_family.standin_processor(56, patch_size, "default") if llava else \
        onevision.standin_processor(56, patch_size, "full", TINY_PINPOINTS, "anyres_max_9")
    tok = processor.tokenizer
    text = dict(TINY_VLM_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(TINY_VLM_VISION, num_hidden_layers=vision_layers, patch_size=patch_size)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"))
    _seeded(seed)
    if llava:
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text), **ids,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
    else:
        cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(**text), **ids,
                                   video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=TINY_PINPOINTS,
                                   vision_feature_layer=-1, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9")
        model = LlavaOnevisionForConditionalGeneration(cfg)
    model = model.to(dtype).eval()
    model.config.get_text_config()._attn_implementation = attn
    model.config.vision_config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


# Tiny Qwen2-VL / Qwen2.5-VL (design study shapes): a 4-block ViT (Qwen2.5: full attention in
# blocks 1 and 3, 112 px windows), 14 px patches in 2 x 2 units, a 2-layer GQA decoder with
# M-RoPE sections [2, 3, 3] of its 16-dim heads, and the real processor classes.
def tiny_qwen(version: str = "2.5", dtype: torch.dtype = torch.float32, attn: str = "sdpa",
              seed: int = 0, text_layers: int = 2) -> tuple[nn.Module, Any]:
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from dymu_viz.vlm.families.qwen2_vl import standin_processor

    processor = standin_processor(version, min_pixels=28 * 28, max_pixels=28 * 28 * 64)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(TINY_VLM_TEXT, num_hidden_layers=text_layers, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [2, 3, 3]})
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    _seeded(seed)
    if version == "2.5":
        vision.update(out_hidden_size=TINY_VLM_TEXT["hidden_size"], fullatt_block_indexes=[1, 3], window_size=112)
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
    else:
        vision = dict(vision, embed_dim=vision.pop("hidden_size"), hidden_size=TINY_VLM_TEXT["hidden_size"],
                      mlp_ratio=2)
        vision.pop("intermediate_size")
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
    model = model.to(dtype).eval()
    model.config.get_text_config()._attn_implementation = attn
    model.config.vision_config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def tiny_qwen3(dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0, text_layers: int = 2,
               moe: bool = False) -> tuple[nn.Module, Any]:
    """Tiny Qwen3-VL (or its MoE variant): a 4-block ViT of 16 px patches in 2 x 2 units with
    DeepStack after blocks 0 and 2, learned position embeddings on a 4 x 4 grid (interpolated per
    image), a 2-layer GQA decoder with interleaved M-RoPE sections [4, 2, 2] of its 16-dim heads,
    and the real processor classes."""
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration)
    from dymu_viz.vlm.families.qwen3_vl import standin_processor

    processor = standin_processor(16, min_pixels=32 * 32, max_pixels=32 * 32 * 64)
    tok = processor.tokenizer
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = dict(TINY_VLM_TEXT, num_hidden_layers=text_layers, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None, head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                 "mrope_interleaved": True})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
                  out_hidden_size=TINY_VLM_TEXT["hidden_size"])
    _seeded(seed)
    config, cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else \
        (Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    model = cls(config(vision_config=vision, text_config=text, **ids)).to(dtype).eval()
    model.config.get_text_config()._attn_implementation = attn
    if moe:  # the grouped GEMM kernel has no float64: the loop over experts runs in any dtype
        model.config.get_text_config()._experts_implementation = "eager"
    model.config.vision_config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor


def encode_images(model: nn.Module, **arguments: Any) -> list:
    """The ``ImageTokens`` of every image in the forward ``arguments`` (pixel_values, ...), as the
    patched model's family makes them with its current settings."""
    from dymu_viz import vlm

    family = vlm.family_of(model)
    return family.encode(model, model.dymu_vlm.settings, family.inputs[0], arguments)


def check_half_precision(model: nn.Module, inputs: dict, dtype: torch.dtype) -> None:
    """The patched model's logits in ``dtype`` against its float32 ones (model and inputs are
    converted in place): finite, within 0.02 (bf16) / 0.003 (fp16) on the valid positions."""
    full = model(**inputs).logits
    model.to(dtype)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    half = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert torch.isfinite(half).all()
    assert float((half[valid].float() - full[valid]).abs().max()) < (0.02 if dtype == torch.bfloat16 else 0.003)


def forcing_token(token: int, at_length: int) -> Any:
    """generate(logits_processor=...) that forces ``token`` when the sequence is ``at_length``
    long (every row), e.g. an <image> token a model might generate."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceToken(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if input_ids.shape[1] != at_length:
                return scores
            forced = torch.full_like(scores, -1e9)
            forced[:, token] = 0
            return forced

    return LogitsProcessorList([ForceToken()])


def video_beside_image(processor: Any, image: Any, dtype: torch.dtype = torch.float32) -> dict:
    """The processor's inputs for two prompts, left padded: a 4-frame 56 px video (two frames of a
    photo, then two of a shapes image) and ``image``; pixels in ``dtype``."""
    import numpy as np
    from dymu_viz import sample_photos, shapes_image

    photo = sample_photos(["chelsea"])["chelsea"].resize((56, 56))
    frames = np.stack([np.asarray(photo)] * 2 + [np.asarray(shapes_image(3, size=56).convert("RGB"))] * 2)
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text",
                                              "text": "what happens ?"}]}], add_generation_prompt=True)
               for kind in ("video", "image")]
    out = dict(processor(videos=[frames], images=[image], text=prompts, return_tensors="pt", padding=True))
    return {k: v.to(dtype) if k.startswith("pixel_values") else v for k, v in out.items()}


def check_unmerged_is_vanilla(model: nn.Module, inputs: dict) -> None:
    """``patch_vlm(model, None)`` on the unpatched ``model``: the valid positions' logits within
    1e-5 of vanilla's and beam search's tokens (2 beams) equal to vanilla's."""
    from dymu_viz import vlm

    valid = inputs["attention_mask"].bool()
    ref = model(**inputs).logits
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2)
    vanilla = model.generate(**inputs, **beams)
    vlm.patch_vlm(model, None)
    assert (model(**inputs).logits - ref)[valid].abs().max() <= 1e-5
    assert torch.equal(model.generate(**inputs, **beams), vanilla)


def check_causal_and_cached_decode(model: nn.Module, inputs: dict, atol: float = 1e-5) -> None:
    """A padded batch through the patched model: appending tokens to every row leaves the logits
    of the prompt's positions as they were (no query sees a later token), and cached
    generation's last logits equal a recomputation of the whole sequence."""
    prompt = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    extra = inputs["input_ids"][:, -3:]
    longer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], extra], 1),
              "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)}
    assert (model(**longer).logits[:, :prompt.shape[1]] - prompt)[valid].abs().max() <= atol
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                         suppress_tokens=[model.config.image_token_id])  # a recomputed prompt must not gain images
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    full = model(**{**inputs, "input_ids": out.sequences, "attention_mask": mask}).logits
    assert torch.allclose(out.logits[-1], full[:, -2], atol=atol, rtol=0)


def tiny_internvl(dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0, text_layers: int = 2,
                  max_patches: int = 4, vision_overrides: dict | None = None) -> tuple[nn.Module, Any]:
    """Tiny InternVL3: a 3-block InternViT (CLS, layer scales) on 56 px tiles of 7 px patches (an
    8 x 8 grid, 16 units after the 2 x 2 pixel shuffle), 1 to ``max_patches`` tiles plus a
    thumbnail per image, the MLP projector and a 2-layer GQA Qwen2 decoder; the real processor
    classes. ``vision_overrides`` change the tower's config (InternViT-6B's q/k and RMS norms, say)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from dymu_viz.vlm.families.internvl import standin_processor

    processor = standin_processor(56, 7, max_patches=max_patches)
    tok = processor.tokenizer
    text = dict(TINY_VLM_TEXT, num_hidden_layers=text_layers, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None, model_type="qwen2")
    vision = dict(TINY_VLM_VISION, num_hidden_layers=3, image_size=56, patch_size=7, hidden_act="gelu",
                  attention_bias=True, layer_scale_init_value=0.5, use_mean_pooling=True)
    vision.update(vision_overrides or {})
    _seeded(seed)
    model = InternVLForConditionalGeneration(InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=processor.image_seq_length)).to(dtype).eval()
    model.config.get_text_config()._attn_implementation = attn
    model.config.vision_config._attn_implementation = "sdpa"
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, processor
