"""open_clip's own ViT (OpenAI CLIP: ViT-L-14-336, ViT-B-16, ...): CLS token, packed
``nn.MultiheadAttention`` in-projection, ln_pre / ln_post, CLS or mean pooling, projection."""

from __future__ import annotations

import sys
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..encoder import BlockParts, EncoderResult, weighted_mean
from .base import EncoderAdapter, fused_qkv, optional


def in_projection(attn: nn.MultiheadAttention):
    """The packed q/k/v in-projection of an nn.MultiheadAttention, read at call time."""
    return lambda h: F.linear(h, attn.in_proj_weight, attn.in_proj_bias)


class OpenClipViTAdapter(EncoderAdapter):
    family = "open_clip ViT"
    reference_prefix = "visual.transformer.resblocks"  # threshold keys in reference .pth checkpoints
    protected = 1

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """An open_clip ViT, recognised without importing open_clip: where it is not imported (or
        not installed) no module is one of its models."""
        transformer = sys.modules.get("open_clip.transformer")
        return transformer is not None and isinstance(module, transformer.VisionTransformer)

    def check_supported(self) -> None:
        from open_clip.transformer import ResidualAttentionBlock
        m = self.module
        if m.attn_pool is not None:
            raise NotImplementedError("open_clip ViTs with an attentional pooler (CoCa) are not supported")
        if not all(isinstance(b, ResidualAttentionBlock) for b in m.transformer.resblocks):
            raise NotImplementedError("only open_clip's standard ResidualAttentionBlock is supported")
        if not m.transformer.batch_first:
            raise NotImplementedError("open_clip transformers with batch_first=False are not supported")

    def build_blocks(self) -> list[BlockParts]:
        parts = []
        for blk in self.module.transformer.resblocks:
            attn: nn.MultiheadAttention = blk.attn
            parts.append(BlockParts(
                norm1=blk.ln_1, qkv=fused_qkv(in_projection(attn), attn.num_heads),
                proj=attn.out_proj, norm2=blk.ln_2, mlp=blk.mlp, ls1=optional(blk.ls_1), ls2=optional(blk.ls_2)))
        return parts

    def expected_size(self) -> tuple[int, int]:
        return tuple(self.module.image_size)

    def patch_size(self) -> tuple[int, int]:
        return tuple(self.module.patch_size)

    def embed(self, pixels: Tensor, **kwargs: Any) -> Tensor:
        return self.module._embeds(pixels.to(self.module.conv1.weight.dtype))

    def pool(self, result: EncoderResult) -> Tensor:
        """open_clip's _pool + proj, with mean pooling weighted by size over valid patches."""
        m, x = self.module, result.tokens
        if not m.final_ln_after_pool:
            x = m.ln_post(x)
        if m.pool_type == "tok":
            pooled = x[:, 0]
        elif m.pool_type == "avg":
            pooled = weighted_mean(x[:, 1:], result.sizes[:, 1:])
        else:
            pooled = x
        if m.final_ln_after_pool:
            pooled = m.ln_post(pooled)
        return pooled @ m.proj if m.proj is not None else pooled

    def forward(self, state: Any, x: Tensor) -> Any:
        result = state.run(x)
        if self.module.output_tokens:
            tokens = self.module.ln_post(result.tokens) if not self.module.final_ln_after_pool else result.tokens
            return result.pooled, (tokens if self.module.pool_type == "none" else tokens[:, 1:])
        return result.pooled
