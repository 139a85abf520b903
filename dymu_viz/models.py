"""Build the encoders users know by name, with real weights when they are on this machine.

``load_encoder(name, pretrained=...)``:

* ``pretrained="random"``: the exact architecture, randomly initialised (says so);
* an open_clip tag (``"openai"``, ``"webli"``) or an HF id: the weights from the local cache,
  or a clear error (pass ``allow_download=True`` to fetch them);
* a file or folder path: those weights;
* ``"auto"``: the default pretrained weights if they are cached locally, else random init, and
  the returned ``LoadedEncoder.weights`` says which, in words, for the caller to print.

Nothing is ever downloaded unless asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

# open_clip model name -> default pretrained tag.
OPEN_CLIP_MODELS = {
    "ViT-L-14-336": "openai",
    "ViT-L-14": "openai",
    "ViT-B-16": "openai",
    "ViT-B-32": "openai",
    "ViT-B-16-SigLIP-384": "webli",
    "ViT-B-16-SigLIP": "webli",
    "ViT-SO400M-14-SigLIP-384": "webli",
}

# HF ids -> (family, vision config of the exact architecture, image processor settings).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HF_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "openai/clip-vit-large-patch14-336": ("clip", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        dict(size=336, crop=True, mean=_CLIP_MEAN, std=_CLIP_STD)),
    "openai/clip-vit-base-patch16": ("clip", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
        dict(size=224, crop=True, mean=_CLIP_MEAN, std=_CLIP_STD)),
    "google/siglip-so400m-patch14-384": ("siglip", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh"),
        dict(size=384, crop=False, mean=(0.5,) * 3, std=(0.5,) * 3)),
    "google/siglip-base-patch16-384": ("siglip", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=384, patch_size=16, hidden_act="gelu_pytorch_tanh"),
        dict(size=384, crop=False, mean=(0.5,) * 3, std=(0.5,) * 3)),
}


@dataclass
class LoadedEncoder:
    """A model ready for ``dymu_viz.patch``, its eval transform (PIL -> (3, H, W) tensor) and
    a plain-words statement of where its weights came from."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    name: str
    weights: str
    pretrained: bool


def known_models() -> list[str]:
    return list(OPEN_CLIP_MODELS) + list(HF_MODELS)


def load_encoder(name: str, pretrained: str = "auto", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_download: bool = False) -> LoadedEncoder:
    """Build encoder ``name`` (an open_clip name, an HF id, or a local HF folder)."""
    if name in OPEN_CLIP_MODELS:
        loaded = _load_open_clip(name, pretrained, allow_download)
    elif name in HF_MODELS or Path(name).is_dir():
        loaded = _load_hf(name, pretrained, allow_download)
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}, or a local HF model folder")
    loaded.model = loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _random_note(name: str, reason: str) -> str:
    return f"RANDOM (random initialisation of the exact {name} architecture: {reason})"


def _open_clip_cached_file(name: str, tag: str) -> Optional[str]:
    """Path of cached open_clip weights for (name, tag), looking only at local caches."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {name}; "
                         f"available: {open_clip.list_pretrained_tags_by_model(name)}")
    repo = cfg.get("hf_hub", "").rstrip("/")
    if repo:
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url:
        legacy = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if legacy.is_file():
            return str(legacy)
    return None


def _load_open_clip(name: str, pretrained: str, allow_download: bool) -> LoadedEncoder:
    import open_clip

    default_tag = OPEN_CLIP_MODELS[name]
    if pretrained == "random":
        source, weights = None, _random_note(name, "asked for")
    elif Path(pretrained).is_file():
        source, weights = pretrained, f"pretrained, from the file {Path(pretrained).name}"
    else:
        tag = default_tag if pretrained == "auto" else pretrained
        cached = _open_clip_cached_file(name, tag)
        if cached is not None:
            source, weights = cached, f"pretrained ({tag}), from the local cache"
        elif allow_download:
            source, weights = tag, f"pretrained ({tag}), downloaded"
        elif pretrained == "auto":
            source, weights = None, _random_note(name, f"no local copy of the {tag!r} weights")
        else:
            raise FileNotFoundError(
                f"the {tag!r} weights of {name} are not in the local cache; download them explicitly "
                "(allow_download=True / --download), or pass a checkpoint path, or use pretrained='random'")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source)
    return LoadedEncoder(model, preprocess, name, weights, source is not None)


def _load_hf(name: str, pretrained: str, allow_download: bool) -> LoadedEncoder:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if pretrained != "random":
        source = pretrained if Path(pretrained).is_dir() else name
        try:
            return _hf_from_pretrained(source, local_files_only=not allow_download)
        except OSError as err:
            if pretrained != "auto" or name not in HF_MODELS:
                raise FileNotFoundError(
                    f"no local copy of {source} ({err.__class__.__name__}); download it explicitly "
                    "(allow_download=True / --download), pass a local folder, or use pretrained='random'") from None
    if name not in HF_MODELS:
        raise ValueError(f"random initialisation needs a known architecture; known HF ids: {', '.join(HF_MODELS)}")
    family, config_kwargs, proc = HF_MODELS[name]
    model_cls, config_cls = (CLIPVisionModel, CLIPVisionConfig) if family == "clip" else (SiglipVisionModel, SiglipVisionConfig)
    model = model_cls(config_cls(**config_kwargs))
    reason = "asked for" if pretrained == "random" else "no local copy of the weights"
    return LoadedEncoder(model, image_transform(**proc), name, _random_note(name, reason), False)


def _hf_from_pretrained(source: str, local_files_only: bool) -> LoadedEncoder:
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    kind = getattr(config, "model_type", "")
    model_cls = CLIPVisionModel if kind.startswith("clip") else SiglipVisionModel
    model = model_cls.from_pretrained(source, local_files_only=local_files_only)
    processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
    preprocess = lambda img: processor(images=img, return_tensors="pt")["pixel_values"][0]  # noqa: E731
    return LoadedEncoder(model, preprocess, source, f"pretrained, from {source}", True)


def image_transform(size: int, crop: bool, mean: tuple, std: tuple) -> Callable[[Any], torch.Tensor]:
    """Eval transform: CLIP style (resize shortest side + center crop) or SigLIP style (squash)."""
    from torchvision import transforms as T

    resize = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)] if crop else \
        [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose([*resize, lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(mean, std)])
