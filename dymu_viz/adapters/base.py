"""What every family adapter provides to the generic loop in ``dymu_viz.encoder``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..encoder import BlockParts, EncoderResult, MergeConfig, run_blocks


def separate_qkv(q: nn.Module, k: nn.Module, v: nn.Module, heads: int) -> Callable[[Tensor], Tensor]:
    """qkv callable for blocks with three projection layers (HF CLIP / SigLIP):
    (..., C) -> (..., 3, heads, head_dim)."""
    return lambda h: torch.stack([q(h), k(h), v(h)], dim=-2).unflatten(-1, (heads, -1))


def fused_qkv(project: Callable[[Tensor], Tensor], heads: int) -> Callable[[Tensor], Tensor]:
    """qkv callable for blocks with one packed in-projection (open_clip, timm):
    ``project`` maps (..., C) -> (..., 3*heads*head_dim); the result is (..., 3, heads, head_dim)."""
    return lambda h: project(h).unflatten(-1, (3, heads, -1))


def optional(module: nn.Module) -> nn.Module | None:
    """None for an Identity layer (skipped by the loop), else the module."""
    return None if isinstance(module, nn.Identity) else module


class EncoderAdapter:
    """Base adapter: subclasses name their family and fill in embed / blocks / finish."""

    family: str = ""
    protected: int = 0
    reference_prefix: str = ""

    def __init__(self, module: nn.Module):
        self.module = module
        self.check_supported()
        self.build_blocks()  # an unsupported layout fails at patch time, not at the first call

    @property
    def blocks(self) -> list[BlockParts]:
        """The block callables, read off the module at every call, so that what changed after
        patching runs: layers wrapped or replaced (PEFT / LoRA, quantised linears), blocks
        removed, weights loaded with ``assign=True``."""
        return self.build_blocks()

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    def check_supported(self) -> None:
        """Raise NotImplementedError for configurations the adapter does not cover."""

    def build_blocks(self) -> list[BlockParts]:
        raise NotImplementedError

    def expected_size(self) -> tuple[int, int] | None:
        """(H, W) the encoder accepts, or None when any size is fine."""
        return None

    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def grid(self, pixels: Tensor) -> tuple[int, int]:
        """(rows, columns) of the patch grid the embedding makes of these pixels."""
        (ph, pw), (h, w) = self.patch_size(), pixels.shape[-2:]
        return h // ph, w // pw

    def embed(self, pixels: Tensor, **kwargs: Any) -> Tensor:
        """(B, 3, H, W) -> (B, N0, C) tokens entering the first block."""
        raise NotImplementedError

    def pool(self, result: EncoderResult) -> Tensor | None:
        """The family's pooled output, respecting sizes and padding."""
        return None

    def forward(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        """The patched module's forward, with the unpatched signature and return type."""
        raise NotImplementedError

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def check_pixels(self, pixels: Tensor, resize_ok: bool = False) -> None:
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or not pixels.shape[0]:
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"{self.family} encoder expects pixels of shape (B, C, H, W) with B >= 1, got {got}")
        expected = self.expected_size()
        if expected is not None and not resize_ok and tuple(pixels.shape[-2:]) != tuple(expected):
            raise ValueError(
                f"{self.family} encoder expects {expected[0]}x{expected[1]} images, got "
                f"{pixels.shape[-2]}x{pixels.shape[-1]}; preprocess with the model's own transform")
        if torch.isnan(pixels).any():
            raise ValueError("input pixels contain NaN; check the image loading and preprocessing")

    def run(self, pixels: Tensor, config: MergeConfig, output_hidden_states: bool = False,
            blocks: int | None = None, **embed_kwargs: Any) -> EncoderResult:
        """Embed, run the blocks with merging, pool. blocks: run only the first ones (a VLM
        reading an inner layer needs no more); the result then has no pooled output."""
        self.check_pixels(pixels, resize_ok=bool(embed_kwargs.get("interpolate_pos_encoding")))
        parts = self.blocks
        config.check_depth(len(parts), self.family)
        x = self.embed(pixels, **embed_kwargs)
        grid = self.grid(pixels)
        if blocks is not None and not 0 <= blocks <= len(parts):
            raise ValueError(f"cannot run {blocks} blocks of the {len(parts)}-block {self.family} encoder")
        run_all = blocks is None or blocks == len(parts)
        result = run_blocks(x, parts if run_all else parts[:blocks], config, self.protected, grid,
                            output_hidden_states)
        result.pooled = self.pool(result) if run_all else None
        result.patch_size = tuple(self.patch_size())
        return result
