"""Token accounting, image complexity and FLOP estimates for merging ViT encoders."""

from __future__ import annotations

import io
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .encoder import EncoderResult


def attention_score_flops(n: float, width: int) -> float:
    """FLOPs of QK^T and AV for n tokens (multiply-adds count 2)."""
    return 2 * 2 * n * n * width


def block_flops(n_attn: float, n_mlp: float, width: int, mlp_hidden: int) -> float:
    """FLOPs of one pre-norm ViT block: attention on n_attn tokens, MLP on n_mlp tokens
    (a merge sits between the two). Multiply-adds count 2; norms and softmax are ignored."""
    qkv_out = 2 * n_attn * width * 4 * width  # q, k, v and output projections
    mlp = 2 * 2 * n_mlp * width * mlp_hidden
    return qkv_out + attention_score_flops(n_attn, width) + mlp


def encoder_flops(counts: Sequence[int], width: int, mlp_hidden: int) -> float:
    """FLOPs of the blocks for one image whose token counts after the embedding and after each
    block are ``counts`` (L + 1 entries)."""
    return sum(block_flops(counts[i], counts[i + 1], width, mlp_hidden) for i in range(len(counts) - 1))


def flop_ratio(counts: torch.Tensor, width: int, mlp_hidden: int) -> float:
    """Unmerged / merged block FLOPs, summed over the images of ``counts`` (B, L+1): the
    speed-up that merging could give at best."""
    full = [int(counts[0, 0])] * counts.shape[1]
    merged = sum(encoder_flops(row, width, mlp_hidden) for row in counts.tolist())
    return counts.shape[0] * encoder_flops(full, width, mlp_hidden) / merged


def padded_flop_overhead(counts: torch.Tensor, width: int, mlp_hidden: int) -> float:
    """Extra block FLOPs spent on padding when ``counts`` (B, L+1) run as one padded batch, as
    a share of the valid work. The encoder runs norms, projections and MLPs on valid tokens
    only; attention (QK^T, AV) runs every image at the longest image's length."""
    longest = counts.max(dim=0).values.tolist()
    valid = sum(encoder_flops(row, width, mlp_hidden) for row in counts.tolist())
    padded = sum(attention_score_flops(longest[i], width) - attention_score_flops(n[i], width)
                 for n in counts.tolist() for i in range(len(longest) - 1))
    return padded / valid


CountsLike = Union[EncoderResult, Sequence[EncoderResult], torch.Tensor, np.ndarray]


def count_matrix(counts: CountsLike) -> np.ndarray:
    """Token counts as an (n_images, L+1) int array, from an ``EncoderResult``, a list of
    results (their batches stacked in order), or a (B, L+1) counts tensor / array. Lets every
    plot and summary take one image, one batch or a whole image set alike."""
    if isinstance(counts, (list, tuple)) and counts and isinstance(counts[0], EncoderResult):
        return np.concatenate([count_matrix(r) for r in counts])
    if isinstance(counts, EncoderResult):
        counts = counts.counts
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    array = np.asarray(counts)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise ValueError(f"token counts must be (n_images, layers + 1), got shape {array.shape}")
    if array.size == 0:
        raise ValueError("no token counts: the image set is empty")
    return array.astype(np.int64)


def layer_count_stats(counts: CountsLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each (L+1,): token count per layer averaged over the images (population
    std, 0 for a single image) -- the curve and band of a per-layer count plot."""
    c = count_matrix(counts).astype(np.float64)
    return c.mean(0), c.std(0)


def jpeg_bytes_per_pixel(image: Union[Image.Image, np.ndarray], quality: int = 75) -> float:
    """Image complexity as JPEG bytes per pixel at a fixed quality: flat images compress to
    almost nothing, busy ones do not. image: PIL image or (H, W, 3) uint8 array (use the
    image as the model sees it, after resizing and cropping)."""
    pil = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    pil.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / (pil.width * pil.height)


def token_accounting(result: EncoderResult, mlp_ratio: float = 4.0) -> dict[str, np.ndarray]:
    """Per image (B,) of an encoder result: ``physical`` patch tokens the encoder outputs (CLS
    and other protected tokens excluded, as a LLaVA-style VLM takes them), ``virtual`` patch
    positions a VLM sees with virtual token unmerging (every original patch), and
    ``encoder_flops`` the fraction of the unmerged encoder's block FLOPs spent (estimate with
    MLP hidden = mlp_ratio * width)."""
    counts = count_matrix(result)
    width = int(result.tokens.shape[-1])
    hidden = int(round(mlp_ratio * width))
    full = encoder_flops([int(counts[0, 0])] * counts.shape[1], width, hidden)
    return {
        "physical": counts[:, -1] - result.protected,
        "virtual": counts[:, 0] - result.protected,
        "encoder_flops": np.array([encoder_flops(row, width, hidden) / full for row in counts.tolist()]),
    }


def quarter_layers(depth: int) -> list[int]:
    """Block indices at a quarter, half, three quarters and all of the depth (1-based)."""
    return sorted({max(1, round(depth * q)) for q in (0.25, 0.5, 0.75, 1.0)})


def count_table(counts: CountsLike, names: Sequence[str], layers: Optional[Sequence[int]] = None) -> str:
    """A plain-text table: per image "in -> out" and the counts after ``layers`` (default:
    the quarter points of the depth), then the mean ± std of the output counts."""
    c = count_matrix(counts)
    if len(names) != len(c):
        raise ValueError(f"{len(names)} names for {len(c)} images; give one name per image")
    depth = c.shape[1] - 1
    layers = list(layers) if layers is not None else quarter_layers(depth)
    width = max(10, *(len(n) for n in names))
    lines = [f"{'image':<{width}} {'in':>5} -> {'out':>4}   " + " ".join(f"{'L' + str(m):>5}" for m in layers)]
    lines += [f"{name:<{width}} {row[0]:>5} -> {row[-1]:>4}   " + " ".join(f"{row[m]:>5}" for m in layers)
              for name, row in zip(names, c.tolist())]
    finals = c[:, -1]
    lines.append(f"{'mean ± std':<{width}} {c[0, 0]:>5} -> {finals.mean():.1f} ± {finals.std():.1f}")
    return "\n".join(lines)
