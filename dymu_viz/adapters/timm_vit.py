"""timm VisionTransformer, alone or as the trunk of an open_clip model (the SigLIP towers:
ViT-B-16-SigLIP-384, ViT-SO400M-14-SigLIP-384). No CLS token there; the MAP attention-pool
head gets the log-size bias and the padding mask."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..encoder import BlockParts, EncoderResult, attention_bias, weighted_mean
from .base import EncoderAdapter, fused_qkv, optional


class TimmViTAdapter(EncoderAdapter):
    family = "timm ViT"
    reference_prefix = "visual.trunk.blocks"  # threshold keys in reference .pth checkpoints

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer
        return isinstance(module, VisionTransformer)

    def check_supported(self) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block
        m = self.module
        if m.num_prefix_tokens > 1:
            raise NotImplementedError("timm ViTs with register tokens (more than one prefix token) are not supported")
        self.protected = m.num_prefix_tokens
        for blk in m.blocks:
            if type(blk) is not Block or type(blk.attn) is not Attention or getattr(blk.attn, "gate", None) is not None:
                raise NotImplementedError(f"timm block type {type(blk).__name__} is not supported (standard Block only)")
        if m.global_pool not in ("", "token", "avg", "map"):
            raise NotImplementedError(f"timm global_pool {m.global_pool!r} is not supported")

    def build_blocks(self) -> list[BlockParts]:
        parts = []
        for blk in self.module.blocks:
            attn = blk.attn
            qkv = fused_qkv(attn.qkv, attn.num_heads)
            if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
                def qkv(h: Tensor, packed=qkv, attn=attn) -> Tensor:
                    q, k, v = packed(h).unbind(-3)  # (..., heads, head_dim) each
                    return torch.stack([attn.q_norm(q), attn.k_norm(k), v], dim=-3)

            def proj(o: Tensor, attn=attn) -> Tensor:
                return attn.proj(attn.norm(o))

            parts.append(BlockParts(norm1=blk.norm1, qkv=qkv, proj=proj, norm2=blk.norm2, mlp=blk.mlp,
                                    ls1=optional(blk.ls1), ls2=optional(blk.ls2)))
        return parts

    def expected_size(self) -> tuple[int, int] | None:
        pe = self.module.patch_embed
        return None if getattr(self.module, "dynamic_img_size", False) else tuple(pe.img_size)

    def patch_size(self) -> tuple[int, int]:
        return tuple(self.module.patch_embed.patch_size)

    def grid(self, pixels: Tensor) -> tuple[int, int]:
        """The patch grid, padded up to whole patches with ``dynamic_img_pad``."""
        return tuple(self.module.patch_embed.dynamic_feat_size(tuple(pixels.shape[-2:])))

    def embed(self, pixels: Tensor, **kwargs: Any) -> Tensor:
        m = self.module
        x = m.patch_embed(pixels.to(m.patch_embed.proj.weight.dtype))
        return m.norm_pre(m.patch_drop(m._pos_embed(x)))

    def pool(self, result: EncoderResult) -> Tensor:
        """timm forward_head on the normed features, size- and padding-aware."""
        m = self.module
        x, size = m.norm(result.tokens), result.sizes
        if m.attn_pool is not None:
            if not m.pool_include_prefix:
                x, size = x[:, m.num_prefix_tokens:], size[:, m.num_prefix_tokens:]
            x = m.attn_pool(x, attn_mask=attention_bias(size, x.dtype))
        elif m.global_pool == "token":
            x = x[:, 0]
        elif m.global_pool == "avg":
            start = 0 if m.pool_include_prefix else m.num_prefix_tokens
            x = weighted_mean(x[:, start:], size[:, start:])
        return m.head(m.head_drop(m.fc_norm(x)))

    def forward(self, state: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("a DyMU-patched encoder builds its own attention mask; attn_mask/is_causal are not supported")
        return state.run(x).pooled

