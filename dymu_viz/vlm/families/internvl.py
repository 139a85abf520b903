"""InternVL3 (``InternVLForConditionalGeneration``): 448 px tiles through InternViT (CLS first),
a 2 x 2 pixel shuffle of its patch grid into *units*, an MLP projector, and a Qwen2.5 LLM with
1-D RoPE.

DToMe runs in one of two places (``PLACEMENTS``), chosen by the thresholds given:

* "rounds" (``calibrate_rounds``'s thresholds, or a list with one value per round): the tower
  runs as HF runs it; DToMe rounds then merge each tile's projected units, on the head-averaged
  pre-attention keys of the last block read (a unit's four patches side by side), as for
  Qwen2.5-VL (``qwen2_vl.unit_rounds``). The tower's FLOPs stay; the LLM's shrink.
* "tower" (a per-layer ``Thresholds`` of the tower from ``dymu_viz.calibrate`` on
  ``model.model.vision_tower``, or one number for every layer): DToMe inside InternViT as for
  CLIP. Every patch then stands for its merged token, so a unit is the four tokens its patches
  stand for; units made of the same four tokens are the same vector in vanilla's computation on
  the merged tower output, and are one compact token here (the projector runs once for each).
  Saves tower FLOPs too, but a unit shrinks only when all four of its patches merged alike.

``benchmarks/internvl.py`` measures both on the bundled photos (tokens against the error of what
the LLM receives); the README gives the figures and why "rounds" is the default.

Items: every run of placeholders (between ``<img>`` and ``</img>``) is one item, an image's
tiles (the processor's crops, then the thumbnail) or one video frame; the tiles of a forward run
as one batch, and every item's tokens count per tile (``crop_tokens``). The LLM numbers
positions 1-D, so VTU lays every unit at its own position, as vanilla does.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ...patch import get_state, patch, unpatch
from ...thresholds import Thresholds
from ..chunk import runs_of
from ..family import VisualInput, VLMFamily, VLMSpec, register
from ..reductions import BASELINES, Baseline, ToMe, check_reduction
from ..standin import CHATML_ROLES, CHATML_SPECIALS, answer_in_words, build_tokenizer, scaled_llm_note, \
    scaled_text_config, tower_blocks
from ..tokens import ImageTokens
from ..tower import tower_output
from .qwen2_vl import ROUNDS_KIND, check_metric, concat_steps, metric_views, piece_reductions, \
    rounds_steps, unit_metric_of, unit_round_thresholds, unit_rounds

PLACEMENTS = ("rounds", "tower")
TILES = VisualInput("image", "image_token_id", "pixel_values", None, ("num_patches",))
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

TileTokens = tuple[Tensor, Tensor]  # a tile's compact tokens (n, D) and its units' rows (S,)


@dataclass(frozen=True)
class InternVLSettings:
    """placement: see ``PLACEMENTS``; rounds: one threshold per DToMe round (None: none), their
    metric (``qwen2_vl.METRICS``); reduction: a matched-budget baseline on each tile's units
    instead of the rounds ("rounds" placement: ``qwen2_vl.piece_reductions``)."""

    placement: str = "rounds"
    rounds: Optional[list[float]] = None
    metric: str = "keys"
    reduction: Optional[Baseline] = None


def grid_of(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of a tile's patch grid."""
    vision = model.config.vision_config
    return vision.image_size[0] // vision.patch_size[0], vision.image_size[1] // vision.patch_size[1]


def unit_patches(model: nn.Module, device: torch.device) -> Tensor:
    """(S, 4) the patches of every unit (raster indices in the tile's grid), units in the order
    HF's pixel shuffle puts them, patches in the order it concatenates their channels: the
    model's own ``pixel_shuffle`` run on the indices."""
    rows, cols = grid_of(model)
    index = torch.arange(rows * cols, device=device, dtype=torch.float64).reshape(1, rows, cols, 1)
    shuffled = model.model.pixel_shuffle(index, scale_factor=model.config.downsample_ratio)
    return shuffled.reshape(-1, shuffled.shape[-1]).long()


def unit_raster(model: nn.Module, device: torch.device) -> Tensor:
    """(S,) the place of every unit (HF's order) on its tile's unit grid, raster order."""
    cols = grid_of(model)[1]
    first = unit_patches(model, device).min(1).values  # each unit's top-left patch
    return first // cols // 2 * (cols // 2) + first % cols // 2


def tile_unit_maps(model: nn.Module, image: ImageTokens) -> Tensor:
    """(tiles, rows / 2, cols / 2) the compact row of every unit of an item's tiles, units laid
    out on their tile's grid (raster order), for merge maps (``viz.plot_unit_merge_maps``)."""
    rows, cols = grid_of(model)
    raster = unit_raster(model, image.mapping.device)
    per_tile = image.mapping.view(-1, len(raster))
    return torch.empty_like(per_tile).index_copy_(1, raster, per_tile).view(-1, rows // 2, cols // 2)


def units_per_tile(model: nn.Module) -> int:
    rows, cols = grid_of(model)
    ratio = model.config.downsample_ratio
    return int(rows * ratio) * int(cols * ratio)


def item_tiles(model: nn.Module, arguments: dict[str, Any]) -> list[int]:
    """Tiles of every item: the image processor's ``num_patches`` when given alone (no prompt),
    else read from the prompts (each run of placeholders is one item, units_per_tile per tile)."""
    tiles = len(arguments["pixel_values"])
    input_ids = arguments.get("input_ids")
    if input_ids is None:
        counts = arguments.get("num_patches")
        if counts is None:
            raise ValueError("InternVL needs input_ids (or the image processor's num_patches) to know which tiles "
                             "belong to which image")
        return [int(n) for n in counts]
    per_tile = units_per_tile(model)
    runs = [end - begin for row in input_ids for begin, end in runs_of(row == model.config.image_token_id)]
    if any(n % per_tile for n in runs) or sum(runs) != tiles * per_tile:
        raise ValueError(f"the prompts' image placeholders come in runs of {runs} ({per_tile} per tile) but {tiles} "
                         "tiles were given: give one image per <IMG_CONTEXT> in the prompts, and build prompts and "
                         "pixels with the model's processor")
    return [n // per_tile for n in runs]


@contextmanager
def _keys_of(tower: nn.Module, blocks: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """While open, the dict it yields receives the head-averaged keys (T, positions, head_dim) of
    each of ``blocks`` whenever the tower runs (InternViT's keys after its optional k norm)."""
    keys: dict[int, Tensor] = {}
    heads = tower.config.num_attention_heads

    def keep(block: int) -> Any:
        def hook(module: nn.Module, args: Any, out: Tensor) -> None:
            keys[block] = out.unflatten(-1, (heads, -1)).mean(-2)
        return hook

    hooks = [tower.encoder.layer[b].attention.k_norm.register_forward_hook(keep(b)) for b in sorted(set(blocks))]
    try:
        yield keys
    finally:
        for hook in hooks:
            hook.remove()


def metric_blocks(model: nn.Module, metric: str, rounds: int) -> list[int]:
    """The blocks whose keys each round matches on: the last block the LLM's features come from
    ("keys"), or round k's share of the blocks up to it ("blocks")."""
    depth = model.config.vision_config.num_hidden_layers
    run = model.config.vision_feature_layer % (depth + 1)
    if run == 0:
        raise ValueError("vision_feature_layer reads the embeddings: no block's keys to match on")
    if metric == "keys":
        return [run - 1]
    return [-(-run * (k + 1) // rounds) - 1 for k in range(rounds)]


def vision_units(model: nn.Module, tiles: Tensor) -> Tensor:
    """(T, S, D) every tile's units exactly as vanilla's ``get_image_features`` computes them: the
    tower's blocks up to ``vision_feature_layer`` (no further), CLS dropped, the pixel shuffle,
    the projector. The blocks are called one by one, not through the tower's forward, whose
    output recording hooks the model with local functions that pickle cannot save."""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    if model.config.vision_feature_select_strategy != "default":
        raise NotImplementedError("DyMU supports InternVL's vision_feature_select_strategy 'default' (CLS dropped)")
    hidden = tower.embeddings(tiles.to(model.dtype))
    for block in tower.encoder.layer[:layer % (len(tower.encoder.layer) + 1)]:
        hidden = block(hidden)
    if layer == -1:
        hidden = tower.layernorm(hidden)
    rows, cols = grid_of(model)
    grid = hidden[:, 1:].reshape(len(hidden), rows, cols, -1)
    units = model.model.pixel_shuffle(grid, scale_factor=model.config.downsample_ratio)
    return model.model.multi_modal_projector(units.reshape(len(hidden), -1, units.shape[-1]))


def tile_units(model: nn.Module, tiles: Tensor, metric: str = "keys", rounds: int = 1) -> tuple[Tensor, Tensor]:
    """Every tile's units (T, S, D) exactly as vanilla's ``get_image_features`` gives them, and
    their metric (T, S, M): ``qwen2_vl.METRICS`` (a unit's four patches' keys side by side; with
    "blocks" the rounds' keys side by side, (T, S, rounds * M))."""
    check_metric(metric)
    if metric == "features":
        units = vision_units(model, tiles)
        return units, units
    blocks = metric_blocks(model, metric, rounds)
    with _keys_of(model.model.vision_tower, blocks) as keys:
        units = vision_units(model, tiles)
    patches = unit_patches(model, tiles.device)
    per_block = [keys[b][:, 1:][:, patches].flatten(-2) for b in blocks]  # CLS dropped; (T, S, 4 * head_dim)
    return units, torch.cat(per_block, -1).to(units.dtype)


def round_tokens(model: nn.Module, tiles: Tensor, thresholds: Optional[Sequence[float]],
                 metric: str, reduction: Optional[Baseline] = None) -> list[TileTokens]:
    """"rounds" placement: per tile, its compact tokens and its units' rows; with a matched-budget
    ``reduction``, that baseline on each tile's unit grid instead of the rounds."""
    if reduction is not None:
        rounds = len(reduction.r) if isinstance(reduction, ToMe) else 1
        units, unit_metric = tile_units(model, tiles, metric if isinstance(reduction, ToMe) else "features", rounds)
        raster = unit_raster(model, tiles.device)
        order = raster.argsort()  # units in raster order, as the grid reductions take them
        rows, cols = grid_of(model)
        grid = (rows // 2, cols // 2)
        reduced = piece_reductions(list(zip(units[:, order], unit_metric[:, order])), [grid] * len(tiles), list(tiles),
                                   reduction, metric_views(metric, rounds) if isinstance(reduction, ToMe) else 1)
        return [(tokens, parts[raster]) for tokens, parts in reduced]
    if not thresholds:
        units = vision_units(model, tiles)
        rows = torch.arange(units.shape[1], device=units.device)
        return [(u, rows) for u in units]
    units, unit_metric = tile_units(model, tiles, metric, len(thresholds))
    size = torch.ones(units.shape[:2], dtype=torch.long, device=units.device)
    x, size, groups = unit_rounds(units, unit_metric, size, thresholds, metric_views(metric, len(thresholds)))
    kept = (size > 0).sum(-1).tolist()
    return [(x[t, :kept[t]], groups[t]) for t in range(len(x))]


def tower_tokens(model: nn.Module, tiles: Tensor) -> list[TileTokens]:
    """"tower" placement: the DToMe tower's tokens of every tile, each patch standing for the
    token it ended in; a unit is its four patches' tokens, and units of the same four tokens are
    one compact token. The projector runs once per compact token."""
    hidden, groups, _ = tower_output(model, tiles)
    if model.config.vision_feature_layer == -1:
        hidden = model.model.vision_tower.layernorm(hidden)  # HF's last_hidden_state (identity when pooling by mean)
    quads = groups[:, 1:][:, unit_patches(model, tiles.device)]  # CLS dropped ("default" strategy, see vision_units)  # (T, S, 4) the token behind each patch of each unit
    distinct = [torch.unique(q, dim=0, return_inverse=True) for q in quads]
    units = torch.cat([hidden[t][rows].flatten(-2) for t, (rows, _) in enumerate(distinct)])  # (sum n, 4 * C)
    projected = model.model.multi_modal_projector(units).split([len(rows) for rows, _ in distinct])
    return [(p, inverse) for p, (_, inverse) in zip(projected, distinct)]


def internvl_items(model: nn.Module, settings: InternVLSettings, arguments: dict[str, Any]) -> list[ImageTokens]:
    """Every item of a forward (an image's tiles, a video frame) as compact tokens, in order."""
    tiles = arguments["pixel_values"]
    if tiles.dim() != 4:
        raise ValueError(f"InternVL pixel_values must be (tiles, 3, H, W), got {tuple(tiles.shape)}")
    counts = item_tiles(model, arguments)
    per_tile = tower_tokens(model, tiles) if settings.placement == "tower" else \
        round_tokens(model, tiles, settings.rounds, settings.metric, settings.reduction)
    out, first = [], 0
    for n in counts:
        tokens, mapping = concat_steps(per_tile[first:first + n])
        out.append(ImageTokens(tokens, mapping, [len(t) for t, _ in per_tile[first:first + n]]).in_slot_order())
        first += n
    return out


@torch.no_grad()
def calibrate_rounds(model: nn.Module, processor: Any, images: Sequence[Any], keep: float = 0.25, rounds: int = 4,
                     batch_size: int = 4, progress: bool = True, metric: str = "keys",
                     out: Optional[Union[str, Path]] = None, resume: bool = False,
                     checkpoint_every: int = 5) -> Thresholds:
    """Thresholds for ``rounds`` DToMe rounds on InternVL's tiles, found on ``images`` so that a
    share ``keep`` of the units survives: the procedure of ``qwen2_vl.calibrate_rounds`` (batch
    thresholds averaged over batches, torchrun-ready, unreadable images skipped and named,
    resumable from the checkpoints beside ``out``), with every tile of every image one row of
    the batch."""
    from .qwen2_vl import calibrate_rounds as calibrate_units

    def units_of(batch: list[Any]) -> list[tuple[Tensor, Tensor]]:
        device = next(model.parameters()).device
        tiles = processor.image_processor(images=batch, return_tensors="pt", crop_to_patches=True)["pixel_values"]
        units, unit_metric = tile_units(model, tiles.to(device), metric, rounds)
        return list(zip(units, unit_metric))

    return calibrate_units(model, processor, images, keep, rounds, batch_size, progress, metric, units_of=units_of,
                           out=out, resume=resume, checkpoint_every=checkpoint_every)


# The stand-in's chat template (ChatML), written after the real processor's prompt format: each
# image as <IMG_CONTEXT> on a line of its own before the text (the processor expands it).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif c['type'] == 'video' %}{{ '<video>\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def standin_processor(size: int = 448, patch: int = 14, ratio: float = 0.5, max_patches: int = 12) -> Any:
    """``InternVLProcessor`` with HF's own tile processor (``size`` px tiles, 1 to ``max_patches``
    crops plus a thumbnail) and video processor, and the stand-in tokenizer with InternVL's
    image tokens (random-init models only). As in the released checkpoints, the image processor
    alone does not tile (``crop_to_patches`` False); the processor's call does (its default)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    norm = dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    images = GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=False, min_patches=1,
                                   max_patches=max_patches, **norm)
    videos = InternVLVideoProcessor(size={"height": size, "width": size}, **norm)
    tokenizer = build_tokenizer(CHATML_SPECIALS, {
        "context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
        "video_token": "<video>", "image_token": "<IMG_CONTEXT>", "im_start": "<|im_start|>"}, CHATML_ROLES)
    return InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                             image_seq_length=int(size // patch * ratio) ** 2, chat_template=CHAT_TEMPLATE)


INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, hidden_act="gelu", norm_type="layer_norm", use_qk_norm=False,
                      attention_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True)
INTERNVIT = "InternViT-300M-448px-V2.5"


class InternVL(VLMFamily):
    """InternVL3: tiles, units, DToMe in rounds after the projector (default) or inside the tower."""

    name = "internvl"
    title = "InternVL3"
    classes = ("InternVLForConditionalGeneration",)
    inputs = (TILES,)
    placeholders = {"image": "<IMG_CONTEXT>", "video": "<video>"}
    config_arguments = ("vision_feature_layer", "vision_feature_select_strategy")
    rounds = True
    baselines = True  # on each tile's units, where the rounds merge
    lmms_name = "dymu_internvl"
    lmms_class = "DyMUInternVL"
    default_pretrained = "OpenGVLab/InternVL3-8B-hf"
    checkpoints = {
        "OpenGVLab/InternVL3-8B-hf": VLMSpec("internvl", INTERNVIT, INTERNVIT_300M, "Qwen2.5-7B", (28, 3584, 151674), {}),
        "OpenGVLab/InternVL3-2B-hf": VLMSpec("internvl", INTERNVIT, INTERNVIT_300M, "Qwen2.5-1.5B", (28, 1536, 151674),
                                             {}),
        "OpenGVLab/InternVL3-1B-hf": VLMSpec("internvl", INTERNVIT, INTERNVIT_300M, "Qwen2.5-0.5B", (24, 896, 151674),
                                             {})}
    model_types = {"internvl": "InternVLForConditionalGeneration"}

    def lmms_processor_options(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """lmms-eval's own InternVL model (``internvl_hf``) crops 1 to 12 tiles per image."""
        return {"min_patches": 1, "max_patches": 12}

    def configure(self, model: nn.Module, thresholds: Any, mode: str, options: dict[str, Any]) -> InternVLSettings:
        unused = sorted(k for k in ("temporal", "window", "tower") if options.get(k) is not None)
        if unused:
            raise ValueError(f"{', '.join(unused)} apply to Qwen-VL's rounds and tower; InternVL's tiles are matched "
                             "whole, its frames one by one, and its tower merges with patch_vlm(model, tower thresholds)")
        if model.config.vision_feature_select_strategy != "default":
            raise NotImplementedError("DyMU supports InternVL's vision_feature_select_strategy 'default' (CLS dropped)")
        tower = model.model.vision_tower
        full = mode == "full"
        if placement_of(thresholds) == "tower":
            if options.get("metric") is not None:
                raise ValueError("metric= sets the rounds' similarity; DToMe inside the tower matches on its own keys")
            patch(tower, None if full else thresholds)
            return InternVLSettings("tower")
        if get_state(tower) is not None:
            unpatch(tower)
        metric = unit_metric_of(thresholds, options.get("metric"))
        if isinstance(thresholds, BASELINES):
            rows, cols = grid_of(model)
            check_reduction(thresholds, (rows // 2, cols // 2))
            return InternVLSettings("rounds", None, metric, None if full else thresholds)
        return InternVLSettings("rounds", None if full else unit_round_thresholds(thresholds), metric)

    def baseline_grids(self, model: nn.Module, processor: Any, images: list[Any]) -> list[tuple[int, int]]:
        rows, cols = grid_of(model)
        return [(rows // 2, cols // 2)] * len(images)

    def baseline_steps(self, model: nn.Module) -> tuple[int, int]:
        return rounds_steps(model)

    def unpatch(self, model: nn.Module) -> None:
        if get_state(model.model.vision_tower) is not None:
            unpatch(model.model.vision_tower)

    def encode(self, model: nn.Module, settings: InternVLSettings, visual: VisualInput,
               arguments: dict[str, Any]) -> list[ImageTokens]:
        return internvl_items(model, settings, arguments)

    def item_lengths(self, model: nn.Module, visual: VisualInput, arguments: dict[str, Any]) -> list[int]:
        return [n * units_per_tile(model) for n in item_tiles(model, arguments)]

    def item_rows(self, model: nn.Module, visual: VisualInput, arguments: dict[str, Any]) -> list[int]:
        return item_tiles(model, arguments)

    def calibrate_rounds(self, model: nn.Module, processor: Any, images: Any, keep: float, rounds: int,
                         batch_size: int, **options: Any) -> Thresholds:
        if options.get("window") is not None:
            raise ValueError("window= is for Qwen-VL's large images; InternVL's rounds match inside each tile")
        if options.get("tower_keep") is not None or options.get("tower_blocks") is not None:
            raise ValueError("tower_keep= merges inside Qwen-VL's tower; InternVL's tower is calibrated with "
                             "dymu_viz.calibrate like an encoder")
        return calibrate_rounds(model, processor, images, keep, rounds, batch_size,
                                **{k: v for k, v in options.items() if k != "window"})

    def build_random(self, spec: VLMSpec, vision_layers: Optional[int], text_layers: int,
                     text_width: int) -> tuple[nn.Module, Any, str]:
        """The real InternViT (its first ``vision_layers`` blocks), the real projector shape into
        an LLM scaled down (Qwen2 with 1-D RoPE), and the stand-in processor."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        vision = dict(spec.vision, num_hidden_layers=tower_blocks(vision_layers, spec.vision["num_hidden_layers"],
                                                                   spec.tower))
        processor = standin_processor(vision["image_size"], vision["patch_size"])
        tok = processor.tokenizer
        text = scaled_text_config(tok, text_layers, text_width, max_position_embeddings=32768, rope_theta=1e6,
                                  num_key_value_heads=max(1, text_width // 128), model_type="qwen2")
        config = InternVLConfig(vision_config=vision, text_config=text,
                                image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                                image_seq_length=processor.image_seq_length)
        model = InternVLForConditionalGeneration(config)
        answer_in_words(model, tok)
        blocks, depth = vision["num_hidden_layers"], spec.vision["num_hidden_layers"]
        layers = f"{depth} layers" if blocks == depth else f"{blocks} of its {depth} layers"
        note = (f"{type(model).__name__} with the {spec.tower} tower at its real "
                f"{'shape' if blocks == depth else 'width'} ({layers} x {vision['hidden_size']}, "
                f"{vision['image_size']} px tiles, patch {vision['patch_size']}, 2 x 2 pixel shuffle) and "
                f"{scaled_llm_note(spec.llm, spec.llm_shape, text_layers, text_width, len(tok))}")
        return model, processor, note


def placement_of(thresholds: Any) -> str:
    """Where thresholds merge: "rounds" for calibrated rounds, a list (one per round), a
    matched-budget baseline or None; "tower" for one number or a per-layer tower ``Thresholds``."""
    if isinstance(thresholds, (int, float)):
        return "tower"
    if isinstance(thresholds, Thresholds) and thresholds.metadata.get("kind") != ROUNDS_KIND:
        return "tower"
    return "rounds"


register(InternVL())
