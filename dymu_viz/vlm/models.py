"""Build the HF LLaVA models users know by id, with real weights when they are on this machine.

``load_vlm(model_id, pretrained=...)``:

* ``"random"``: the model's own config classes, randomly initialised. The vision tower keeps its
  real shape (width, image size, patch size, and depth unless ``vision_layers`` cuts it); the
  language model is *scaled down* (a few layers, a small width, a small word-level vocabulary),
  and the processor is a real HF processor (HF's own image processor at the real image size and
  that small tokenizer), so every token count the processor and the model agree on is the real
  one. ``LoadedVLM.weights`` states the shapes that ran.
* ``"auto"``: the real weights if they are in the local HF cache, else random init (and the note
  says so);
* ``"pretrained"`` or a local folder: the real weights (a clear error when they are not there;
  ``allow_download=True`` fetches them).

Nothing is ever downloaded unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .families import llava, onevision, qwen2_vl

_ANYRES_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_QWEN25_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
                   fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
_QWEN2_VIT = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, hidden_act="quick_gelu")
_SIGLIP_SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                          image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", vision_use_head=False)


@dataclass(frozen=True)
class VLMSpec:
    """What a known id is: its model class, vision tower (real shape), real LLM shape (for the
    note) and the LLaVA settings the processor and model must share."""

    family: str  # "llava", "onevision", "qwen2" or "qwen2.5"
    tower: str
    vision: dict[str, Any]
    llm: str
    llm_shape: tuple[int, int, int]  # real (layers, width, vocab)
    settings: dict[str, Any]


VLM_MODELS: dict[str, VLMSpec] = {
    "llava-hf/llava-1.5-7b-hf": VLMSpec(
        "llava", "CLIP ViT-L/14-336", _CLIP_L_336, "Llama-7B", (32, 4096, 32064),
        dict(vision_feature_layer=-2, vision_feature_select_strategy="default")),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": VLMSpec(
        "onevision", "SigLIP so400m-patch14-384", _SIGLIP_SO400M_384, "Qwen2-7B", (28, 3584, 152128),
        dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
             image_grid_pinpoints=_ANYRES_PINPOINTS)),
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": VLMSpec(
        "onevision", "SigLIP so400m-patch14-384", _SIGLIP_SO400M_384, "Qwen2-0.5B", (24, 896, 151936),
        dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
             image_grid_pinpoints=_ANYRES_PINPOINTS)),
    "Qwen/Qwen2.5-VL-7B-Instruct": VLMSpec(
        "qwen2.5", "Qwen2.5-VL ViT (32 x 1280, window attention)", _QWEN25_VIT, "Qwen2.5-7B", (28, 3584, 152064), {}),
    "Qwen/Qwen2.5-VL-3B-Instruct": VLMSpec(
        "qwen2.5", "Qwen2.5-VL ViT (32 x 1280, window attention)", _QWEN25_VIT, "Qwen2.5-3B", (36, 2048, 151936), {}),
    "Qwen/Qwen2-VL-7B-Instruct": VLMSpec(
        "qwen2", "Qwen2-VL ViT (32 x 1280)", _QWEN2_VIT, "Qwen2-7B", (28, 3584, 152064), {}),
}


def build_processor(model_id: str) -> Any:
    """The real HF processor class of ``model_id`` with HF's own image processor at the real image
    size and the stand-in word-level tokenizer (random-init models only)."""
    spec = _spec(model_id)
    if spec.family.startswith("qwen"):  # HF's default resolution range: 4 to 1280 units of 28 x 28 px
        return qwen2_vl.standin_processor(spec.family.removeprefix("qwen"))
    size, patch, strategy = spec.vision["image_size"], spec.vision["patch_size"], \
        spec.settings["vision_feature_select_strategy"]
    if spec.family == "llava":
        return llava.standin_processor(size, patch, strategy)
    return onevision.standin_processor(size, patch, strategy, spec.settings["image_grid_pinpoints"],
                                       spec.settings["vision_aspect_ratio"])


@dataclass
class LoadedVLM:
    """A LLaVA model ready for ``dymu_viz.vlm.patch_vlm``, its HF processor, and a plain-words
    statement of where the weights came from and what shapes ran."""

    model: nn.Module
    processor: Any
    name: str
    weights: str
    pretrained: bool


def _spec(model_id: str) -> VLMSpec:
    if model_id not in VLM_MODELS:
        raise ValueError(f"unknown VLM {model_id!r}; known: {', '.join(VLM_MODELS)}, or a local HF model folder")
    return VLM_MODELS[model_id]


def load_vlm(model_id: str, pretrained: str = "auto", device: Union[str, torch.device, None] = None,
             dtype: Optional[torch.dtype] = None, allow_download: bool = False, *, device_map: Any = None,
             vision_layers: Optional[int] = None, text_layers: int = 2, text_width: int = 256) -> LoadedVLM:
    """Build VLM ``model_id`` (a known HF id, or a local HF folder) and its processor.

    pretrained: "random", "auto" (the real weights if cached locally, else random), "pretrained"
    (the real weights, or an error), or a local folder holding them. device: default CUDA when
    available, else CPU; dtype: default bfloat16 on CUDA, float32 on CPU. device_map (real
    weights): handed to ``from_pretrained`` (e.g. "auto" to spread a 7B model over the GPUs;
    needs no ``device``). vision_layers (default: the real depth), text_layers and text_width
    shape the random-init model only."""
    if device_map is not None and device is not None:
        raise ValueError("give device or device_map, not both")
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device_map is not None or torch.device(device).type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu and torch.cuda.is_available() else torch.float32)
    if pretrained == "random":
        loaded = _random(model_id, "asked for", vision_layers, text_layers, text_width)
    elif pretrained in ("auto", "pretrained"):
        if model_id not in VLM_MODELS and not Path(model_id).is_dir() and not allow_download:
            _spec(model_id)  # an unknown id: name the known ones
        try:
            loaded = _from_pretrained(model_id, allow_download, dtype, device_map)
        except FileNotFoundError:
            if pretrained != "auto" or model_id not in VLM_MODELS:
                raise
            loaded = _random(model_id, "no local copy of the weights", vision_layers, text_layers, text_width)
    elif Path(pretrained).is_dir():
        loaded = _from_pretrained(pretrained, allow_download, dtype, device_map)
    else:
        raise ValueError(f"pretrained must be 'random', 'auto', 'pretrained' or a local folder, got {pretrained!r}")
    if device_map is not None and not loaded.pretrained:
        if not isinstance(device_map, (str, torch.device)) or device_map == "auto":
            raise ValueError("a random-init model is built on one device: pass device=... (device_map is for real weights)")
        device = device_map
    if not (loaded.pretrained and device_map is not None):
        loaded.model = loaded.model.to(device=device, dtype=dtype)
    loaded.model.eval()
    loaded.weights += f"; {str(dtype).removeprefix('torch.')} on {_placement(loaded.model)}"
    return loaded


def _placement(model: nn.Module) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    return ", ".join(devices)


def _from_pretrained(source: str, allow_download: bool, dtype: torch.dtype, device_map: Any = None) -> LoadedVLM:
    from transformers import (AutoConfig, AutoProcessor, LlavaForConditionalGeneration,
                              LlavaOnevisionForConditionalGeneration)

    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    classes = {"llava": LlavaForConditionalGeneration, "llava_onevision": LlavaOnevisionForConditionalGeneration,
               "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen2_vl": Qwen2VLForConditionalGeneration}
    local = not allow_download
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(f"no local copy of a model in the folder {source} (it has no config.json)")
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        if config.model_type not in classes:
            raise ValueError(f"{source} is a {config.model_type!r} model; dymu_viz.vlm runs {', '.join(classes)}")
        model = classes[config.model_type].from_pretrained(source, local_files_only=local, dtype=dtype,
                                                            device_map=device_map)
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
    except OSError as err:
        raise FileNotFoundError(
            f"no local copy of {source} ({type(err).__name__}); download it explicitly (allow_download=True), "
            "pass a local folder, or use pretrained='random'") from None
    where = "from a local folder" if Path(source).is_dir() else \
        "downloaded or cached" if allow_download else "from the local cache"
    return LoadedVLM(model, processor, source, f"pretrained {type(model).__name__} ({source}, {where})", True)


def _random(model_id: str, reason: str, vision_layers: Optional[int], text_layers: int, text_width: int) -> LoadedVLM:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    spec = _spec(model_id)
    processor = build_processor(model_id)
    tok = processor.tokenizer
    if spec.family.startswith("qwen"):
        return _random_qwen(model_id, spec, processor, reason, vision_layers, text_layers, text_width)
    depth = spec.vision["num_hidden_layers"]
    if vision_layers is not None and not 1 <= vision_layers <= depth:
        raise ValueError(f"vision_layers must be between 1 and {depth} (the {spec.tower} tower's depth), "
                         f"got {vision_layers}")
    vision = dict(spec.vision, num_hidden_layers=vision_layers or depth)
    heads = max(1, text_width // 64)  # head_dim 64 at any width that is a multiple of 64
    text = dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                num_attention_heads=heads, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"))
    if spec.family == "llava":
        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(
            **text, num_key_value_heads=heads, max_position_embeddings=4096), **ids, **spec.settings)
        model = LlavaForConditionalGeneration(config)
    else:
        config = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**vision), text_config=Qwen2Config(
            **text, num_key_value_heads=max(1, heads // 2), max_position_embeddings=32768, rope_theta=1e6),
            video_token_id=tok.convert_tokens_to_ids("<video>"), **ids, **spec.settings)
        model = LlavaOnevisionForConditionalGeneration(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    gen.suppress_tokens = list(tok.all_special_ids)  # random logits: answer in words, max_new_tokens of them
    layers, width, vocab = spec.llm_shape
    full = vision["num_hidden_layers"] == depth
    tower_depth = f"{depth} layers" if full else f"{vision['num_hidden_layers']} of its {depth} layers"
    note = (f"RANDOM init ({reason}): {type(model).__name__} with the {spec.tower} tower at its real "
            f"{'shape' if full else 'width'} "
            f"({tower_depth} x {vision['hidden_size']}, {vision['image_size']} px, patch {vision['patch_size']}) and "
            f"{spec.llm} scaled down to {text_layers} layers x {text_width}, vocab {len(tok)} "
            f"(real: {layers} x {width}, vocab {vocab}); a word-level tokenizer")
    return LoadedVLM(model, processor, model_id, note, False)


def _random_qwen(model_id: str, spec: VLMSpec, processor: Any, reason: str, vision_layers: Optional[int],
                 text_layers: int, text_width: int) -> LoadedVLM:
    """Qwen2-VL / Qwen2.5-VL at random: the real ViT (its first ``vision_layers`` blocks, the
    full-attention ones among them kept), an LLM scaled down with M-RoPE sections scaled to its
    head dim (the real [16, 24, 24] of 128)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    tok = processor.tokenizer
    depth = spec.vision["depth"]
    if vision_layers is not None and not 1 <= vision_layers <= depth:
        raise ValueError(f"vision_layers must be between 1 and {depth} (the {spec.tower}'s depth), got {vision_layers}")
    blocks = vision_layers or depth
    vision = dict(spec.vision, depth=blocks)
    heads = max(1, text_width // 64)
    half = (text_width // heads) // 2  # M-RoPE sections (t, h, w) split the head dim's half as 2 : 3 : 3
    sections = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    text = dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=len(tok),
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections})
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    if spec.family == "qwen2.5":
        vision.update(out_hidden_size=text_width,
                      fullatt_block_indexes=[i for i in spec.vision["fullatt_block_indexes"] if i < blocks] or [blocks - 1])
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids))
    else:
        vision.update(hidden_size=text_width)
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **ids))
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, None
    gen.suppress_tokens = list(tok.all_special_ids)
    layers, width, vocab = spec.llm_shape
    width_of_vit = spec.vision.get("hidden_size", spec.vision.get("embed_dim"))
    note = (f"RANDOM init ({reason}): {type(model).__name__} with the {spec.tower} at its real width "
            f"({blocks} of its {depth} blocks x {width_of_vit}, patch {spec.vision['patch_size']}, 2 x 2 units) and "
            f"{spec.llm} scaled down to {text_layers} layers x {text_width}, vocab {len(tok)} "
            f"(real: {layers} x {width}, vocab {vocab}); a word-level tokenizer")
    return LoadedVLM(model, processor, model_id, note, False)
