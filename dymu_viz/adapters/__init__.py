"""One small adapter per encoder family; ``find_encoder`` picks the right one."""

from __future__ import annotations

from torch import nn

from .base import EncoderAdapter
from .hf_vision import HFCLIPVisionAdapter, HFInternVLVisionAdapter, HFSiglipVisionAdapter
from .open_clip_vit import OpenClipViTAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: tuple[type[EncoderAdapter], ...] = (
    OpenClipViTAdapter, TimmViTAdapter, HFCLIPVisionAdapter, HFSiglipVisionAdapter, HFInternVLVisionAdapter)


def adapter_for(module: nn.Module) -> type[EncoderAdapter] | None:
    return next((a for a in ADAPTERS if a.matches(module)), None)


def find_encoder(model: nn.Module) -> tuple[nn.Module, type[EncoderAdapter]]:
    """The vision encoder inside ``model`` (the model itself, or e.g. CLIP.visual, an open_clip
    TimmModel's trunk, LLaVA's vision tower) and its adapter class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        adapter = adapter_for(module)
        if adapter is not None:
            return module, adapter
    families = ", ".join(a.family for a in ADAPTERS)
    raise ValueError(f"no supported vision encoder found in {type(model).__name__}; supported families: {families}")


__all__ = ["ADAPTERS", "EncoderAdapter", "adapter_for", "find_encoder"]
