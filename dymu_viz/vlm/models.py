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

from . import families  # noqa: F401  (registers every family)
from .family import FAMILIES, VLMSpec

VLM_MODELS: dict[str, VLMSpec] = {model_id: spec for family in FAMILIES.values()
                                  for model_id, spec in family.checkpoints.items()}  # every family's known ids


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
    if not (loaded.pretrained and device_map is not None):  # from_pretrained gave real weights their dtype
        loaded.model = cast_as_from_pretrained(loaded.model, device, None if loaded.pretrained else dtype)
    loaded.model.eval()
    loaded.weights += f"; {str(dtype).removeprefix('torch.')} on {_placement(loaded.model)}"
    return loaded


def cast_as_from_pretrained(model: nn.Module, device: Union[str, torch.device], dtype: Optional[torch.dtype]) -> nn.Module:
    """``model`` on ``device`` in ``dtype`` (None: as it is) the way ``from_pretrained(dtype=...)``
    leaves a checkpoint: parameters and saved buffers in ``dtype``, the buffers a model computes
    at init and never saves (RoPE's inverse frequencies, float32) as they were. A plain
    ``.to(torch.bfloat16)`` would round those too, and every rotary angle with them."""
    computed = [(module, name, module._buffers[name]) for module in model.modules()
                for name in module._non_persistent_buffers_set
                if module._buffers.get(name) is not None and module._buffers[name].is_floating_point()]
    model = model.to(device=device, dtype=dtype)
    for module, name, buffer in computed:
        module._buffers[name] = buffer.to(device)
    return model


def _placement(model: nn.Module) -> str:
    devices = sorted({str(p.device) for p in model.parameters()})
    return ", ".join(devices)


def _from_pretrained(source: str, allow_download: bool, dtype: torch.dtype, device_map: Any = None) -> LoadedVLM:
    import transformers
    from transformers import AutoConfig, AutoProcessor

    classes = {model_type: getattr(transformers, name) for family in FAMILIES.values()
               for model_type, name in family.model_types.items()}
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
    spec = _spec(model_id)
    family = next(f for f in FAMILIES.values() if model_id in f.checkpoints)
    model, processor, note = family.build_random(spec, vision_layers, text_layers, text_width)
    return LoadedVLM(model, processor, model_id, f"RANDOM init ({reason}): {note}", False)
