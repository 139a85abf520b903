"""HF transformers CLIPVisionModel (LLaVA-1.5's tower) and SiglipVisionModel (LLaVA-OneVision's).

The patched ``forward`` keeps HF's signature and returns ``BaseModelOutputWithPooling``;
``hidden_states`` (on request) follows HF's convention: the embedding output, then every
layer, each padded to its own longest image (masks in ``model.dymu.last``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..encoder import BlockParts, EncoderResult, attention_bias
from .base import EncoderAdapter, separate_qkv


class HFVisionAdapter(EncoderAdapter):
    """Shared by both HF towers: same layer layout (layer_norm1, self_attn, layer_norm2, mlp)."""

    model_class: str = ""
    reference_prefix = "vision_model.encoder.layers"  # threshold keys in reference .pth checkpoints

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        names = {c.__name__ for c in type(module).__mro__}  # the class, a subclass, or DyMU's patched class
        return cls.model_class in names and hasattr(module, "encoder")

    def build_blocks(self) -> list[BlockParts]:
        parts = []
        for layer in self.module.encoder.layers:
            attn = layer.self_attn
            parts.append(BlockParts(
                norm1=layer.layer_norm1, qkv=separate_qkv(attn.q_proj, attn.k_proj, attn.v_proj, attn.num_heads),
                proj=attn.out_proj, norm2=layer.layer_norm2, mlp=layer.mlp))
        return parts

    def expected_size(self) -> tuple[int, int]:
        size = self.module.config.image_size
        return (size, size)

    def patch_size(self) -> tuple[int, int]:
        p = self.module.config.patch_size
        return (p, p)

    def last_hidden_state(self, result: EncoderResult) -> Tensor:
        return result.tokens

    def forward(self, state: Any, pixel_values: Tensor | None = None, interpolate_pos_encoding: bool | None = False,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        config = self.module.config
        if output_hidden_states is None:
            output_hidden_states = bool(config.output_hidden_states)
        if return_dict is None:
            return_dict = bool(getattr(config, "return_dict", True))
        attentions = kwargs.pop("output_attentions", None)
        if attentions or (attentions is None and getattr(config, "output_attentions", False)):
            raise ValueError("output_attentions is not available on a DToMe-patched encoder (the attention's size "
                             "changes at every block that merges); dymu_viz.unpatch(model) gives the maps of the "
                             "unmerged model")
        result = state.run(pixel_values, output_hidden_states=output_hidden_states,
                           interpolate_pos_encoding=bool(interpolate_pos_encoding))
        out = BaseModelOutputWithPooling(last_hidden_state=self.last_hidden_state(result),
                                         pooler_output=result.pooled, hidden_states=result.hidden_states)
        return out if return_dict else out.to_tuple()


class HFCLIPVisionAdapter(HFVisionAdapter):
    family = "HF CLIPVisionModel"
    model_class = "CLIPVisionModel"
    protected = 1

    def embed(self, pixels: Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any) -> Tensor:
        m = self.module
        return m.pre_layrnorm(m.embeddings(pixels, interpolate_pos_encoding=interpolate_pos_encoding))

    def pool(self, result: EncoderResult) -> Tensor:
        return self.module.post_layernorm(result.tokens[:, 0])


class HFSiglipVisionAdapter(HFVisionAdapter):
    family = "HF SiglipVisionModel"
    model_class = "SiglipVisionModel"
    protected = 0

    def embed(self, pixels: Tensor, interpolate_pos_encoding: bool = False, **kwargs: Any) -> Tensor:
        return self.module.embeddings(pixels, interpolate_pos_encoding=interpolate_pos_encoding)

    def last_hidden_state(self, result: EncoderResult) -> Tensor:
        return self.module.post_layernorm(result.tokens)

    def pool(self, result: EncoderResult) -> Tensor | None:
        """The MAP head with log-size bias and padding mask on the probe's keys."""
        m = self.module
        if not m.use_head:
            return None
        head, x = m.head, m.post_layernorm(result.tokens)
        B = x.shape[0]
        heads = head.attention.num_heads
        bias = attention_bias(result.sizes, x.dtype).expand(B, heads, 1, -1).reshape(B * heads, 1, -1)
        h = head.attention(head.probe.repeat(B, 1, 1), x, x, attn_mask=bias)[0]
        h = h + head.mlp(head.layernorm(h))
        return h[:, 0]


class HFInternVLVisionAdapter(HFVisionAdapter):
    """InternViT (``InternVLVisionModel``, InternVL3's tower): CLS first, optional q/k RMS norms
    over the whole width, layer scales on both branches, and a final LayerNorm that is the
    identity when the model pools by mean (InternVL3)."""

    family = "HF InternVLVisionModel"
    model_class = "InternVLVisionModel"
    protected = 1

    def build_blocks(self) -> list[BlockParts]:
        parts = []
        for layer in self.module.encoder.layer:
            attn = layer.attention
            q = nn.Sequential(attn.q_proj, attn.q_norm)  # the norms act on the whole width, before the heads split
            k = nn.Sequential(attn.k_proj, attn.k_norm)
            parts.append(BlockParts(
                norm1=layer.layernorm_before, qkv=separate_qkv(q, k, attn.v_proj, attn.num_heads),
                proj=attn.projection_layer, norm2=layer.layernorm_after, mlp=layer.mlp,
                ls1=layer_scale(layer.lambda_1), ls2=layer_scale(layer.lambda_2)))
        return parts

    def expected_size(self) -> tuple[int, int]:
        return tuple(self.module.config.image_size)

    def patch_size(self) -> tuple[int, int]:
        return tuple(self.module.config.patch_size)

    def embed(self, pixels: Tensor, **kwargs: Any) -> Tensor:
        return self.module.embeddings(pixels)

    def last_hidden_state(self, result: EncoderResult) -> Tensor:
        return self.module.layernorm(result.tokens)


def layer_scale(gamma: nn.Parameter) -> Any:
    """A per-channel layer scale as a callable of the block loop: x -> gamma * x."""
    return lambda x: gamma * x
