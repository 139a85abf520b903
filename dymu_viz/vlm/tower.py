"""Families whose DToMe runs inside the ViT tower (LLaVA-1.5, LLaVA-OneVision): the tower pass
up to the feature layer, the pooling and random-pruning baselines on its output, and the
``configure`` they share (thresholds, ToMe, pooling or random pruning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..patch import encode, get_state, patch, unpatch
from .family import VLMFamily
from .reductions import Pool, RandomPrune, ToMe, crop_seed, pool_groups, pool_patches, random_keep

ImageSegments = list[tuple[Tensor, Tensor]]
OutputReduction = Union[Pool, RandomPrune]  # a baseline applied to the unmerged tower's output


@dataclass(frozen=True)
class TowerSettings:
    """reduction: the baseline applied to the tower's output patches (None: none)."""

    reduction: Optional[OutputReduction] = None


def tower_output(model: nn.Module, pixels: Tensor, reduction: Optional[OutputReduction] = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The DToMe tower run batched on ``pixels`` (B, 3, H, W), up to ``vision_feature_layer`` and
    no further, then ``reduction`` (the pooling or random-pruning baseline on its unmerged
    output): tokens (B, N, C), groups (B, positions) -- the row each position (protected tokens
    first, then the patch grid) ends in -- and sizes (B, N), in the encoder's conventions."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError("DyMU supports a single vision_feature_layer")
    tower = model.model.vision_tower
    depth = get_state(tower).adapter.depth
    if not -depth - 1 <= layer <= depth:
        raise ValueError(f"vision_feature_layer {layer} does not exist in a {depth}-layer vision tower")
    blocks = layer % (depth + 1)  # hidden state `layer` is the output of this many blocks
    result = encode(tower, pixels.to(next(tower.parameters()).dtype), blocks=blocks)
    hidden, groups, sizes = result.tokens, result.groups, result.sizes  # the last block run is the one read
    lead = get_state(tower).adapter.protected
    if isinstance(reduction, Pool):  # the baselines on the output (the tower merged nothing)
        return pooled_tower_output(hidden, lead, reduction)
    if isinstance(reduction, RandomPrune):
        return pruned_tower_output(hidden, lead, reduction, pixels)
    return hidden, groups, sizes


def tower_features(model: nn.Module, pixels: Tensor, reduction: Optional[OutputReduction] = None) -> ImageSegments:
    """Per input image (or crop): (compact features (n, D) after the projector, mapping from
    each of its positions -- patches, plus CLS with the "full" strategy -- to its compact row),
    from ``tower_output``; the projector runs once, batched."""
    hidden, groups, sizes = tower_output(model, pixels, reduction)
    first = 1 if model.config.vision_feature_select_strategy == "default" else 0  # "default" drops CLS
    projected = model.model.multi_modal_projector(hidden[:, first:])  # one batched call; padding rows unused
    counts = ((sizes > 0).sum(-1) - first).tolist()
    return [(projected[b, :n], groups[b, first:] - first) for b, n in enumerate(counts)]


def pooled_tower_output(hidden: Tensor, lead: int, pool: Pool) -> tuple[Tensor, Tensor, Tensor]:
    """The pooling baseline on an unmerged tower output (B, lead + side^2, C), ``lead`` CLS-like
    tokens first: (B, lead + rows * cols, C) with the leading tokens kept, groups (B, lead +
    side^2) and sizes (B, lead + rows * cols) in the encoder's conventions."""
    cells, cell_of = pool_patches(hidden[:, lead:], pool.rows, pool.cols)
    B, device = hidden.shape[0], hidden.device
    groups = torch.cat([torch.arange(lead, device=device), cell_of + lead]).expand(B, -1)
    sizes = torch.bincount(groups[0], minlength=lead + pool.rows * pool.cols).expand(B, -1)
    return torch.cat([hidden[:, :lead], cells], 1), groups, sizes


def pruned_tower_output(hidden: Tensor, lead: int, prune: RandomPrune, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Random pruning of an unmerged tower output (B, lead + side^2, C), each crop drawn from
    its own pixels (B, 3, H, W): (B, lead + keep, C) with the leading tokens kept, then the kept
    patches' own features; groups and sizes as for ``pooled_tower_output``."""
    B, n, _ = hidden.shape
    side = int(round((n - lead) ** 0.5))
    device = hidden.device
    draws = [random_keep(side, prune.keep, crop_seed(prune.seed, pixels[b]), device) for b in range(B)]
    kept = torch.stack([k for k, _ in draws]) + lead  # (B, keep) rows of hidden
    parts = torch.stack([p for _, p in draws]) + lead  # (B, side^2)
    groups = torch.cat([torch.arange(lead, device=device).expand(B, -1), parts], 1)
    sizes = torch.zeros((B, lead + prune.keep), dtype=torch.long, device=device)
    sizes.scatter_add_(1, groups, torch.ones_like(groups))
    rows = torch.cat([torch.arange(lead, device=device).expand(B, -1), kept], 1)
    return hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1])), groups, sizes


class TowerFamily(VLMFamily):
    """A family with DToMe in its ViT tower: thresholds (a ``Thresholds``, one value per layer or
    one for all), a ``ToMe`` or a ``Pool`` baseline; no unit options."""

    baselines = True

    def baseline_grids(self, model: nn.Module, processor: Any, images: list[Any]) -> list[tuple[int, int]]:
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return [(side, side)] * len(images)

    def baseline_steps(self, model: nn.Module) -> tuple[int, int]:
        depth = model.config.vision_config.num_hidden_layers
        return model.config.vision_feature_layer % (depth + 1), depth

    def tower_thresholds(self, model: nn.Module, thresholds: Any) -> Any:
        """The thresholds the tower is patched with (a family may map a reference file's depth)."""
        return thresholds

    def configure(self, model: nn.Module, thresholds: Any, mode: str, options: dict[str, Any]) -> TowerSettings:
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} set the DToMe rounds of families that merge after their tower's "
                             f"output; the {self.name} tower merges on its own keys, and its video input is not "
                             "supported")
        tower = model.model.vision_tower
        if isinstance(thresholds, (Pool, RandomPrune)):  # a size the grid cannot take fails here, not later
            vision = model.config.vision_config
            side = vision.image_size // vision.patch_size
            if isinstance(thresholds, Pool):
                pool_groups(side, thresholds.rows, thresholds.cols, torch.device("cpu"))
            else:
                random_keep(side, thresholds.keep, 0, torch.device("cpu"))
            patch(tower, None)
            return TowerSettings(None if mode == "full" else thresholds)
        if isinstance(thresholds, ToMe):
            depth = model.config.vision_config.num_hidden_layers
            read = model.config.vision_feature_layer % (depth + 1)  # blocks the LLM reads
            patch(tower, None, r=None if mode == "full" else thresholds.per_layer(read, depth))
        else:
            patch(tower, None if mode == "full" else self.tower_thresholds(model, thresholds))
        return TowerSettings()

    def unpatch(self, model: nn.Module) -> None:
        unpatch(model.model.vision_tower)
