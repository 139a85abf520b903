"""The seam between the VLM pipeline and a model family: ``VLMFamily`` and its registry.

A family (one module under ``vlm/families/``) says which HF classes it serves and answers, for
the pipeline, everything that differs between families: how ``patch_vlm``'s settings patch its
tower, how its images and videos become ``ImageTokens``, its RoPE positions (None: 1-D, the
compact / virtual slot order), how many placeholders each visual item takes (for ``generate``'s
per-sample expansion), and its lmms-eval defaults. The pipeline, the VTU core, the baselines,
the eval harness and the CLI ask the family; none of them names one.

    family = family_of(model)          # looked up once per call, by the model's (base) class
    settings = family.configure(model, thresholds, mode, options)
    images = family.encode(model, settings, family.inputs[0], forward_arguments)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from .. import classswap
from .tokens import ImageTokens


@dataclass(frozen=True)
class VLMSpec:
    """A known checkpoint id of a family: its variant (the family's name for the model class it
    is, e.g. "2.5"), the vision tower (a name and its real shape), the real LLM (a name and its
    (layers, width, vocab), for the note of a random build) and the settings its processor and
    model must share."""

    family: str
    tower: str
    vision: dict[str, Any]
    llm: str
    llm_shape: tuple[int, int, int]
    settings: dict[str, Any]
    variant: str = ""


@dataclass(frozen=True)
class VisualInput:
    """One kind of visual input of a family's forward. kind: "image" or "video"; token: the
    config attribute holding its placeholder id; pixels: the forward argument with its pixels;
    grid: the per-item (t, h, w) grids when pixels are patch rows (t * h * w rows per item),
    else None (pixels are per item); extra: its other per-item arguments; spans_runs: see below."""

    kind: str
    token: str
    pixels: str
    grid: Optional[str] = None
    extra: tuple[str, ...] = ()
    spans_runs: bool = False  # an item's placeholders may come in several runs (a video's frames between timestamps)

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.pixels,) + ((self.grid,) if self.grid else ()) + self.extra


IMAGES = VisualInput("image", "image_token_id", "pixel_values", None, ("image_sizes",))


class VLMFamily:
    """The contract (see the module docstring). Subclasses set the class attributes and override
    the methods that differ; the defaults are those of a plain one-image-one-crop VLM."""

    name: str = ""
    title: str = ""  # how people write it, for messages
    classes: tuple[str, ...] = ()  # the HF model classes served, by name
    inputs: tuple[VisualInput, ...] = (IMAGES,)
    placeholders: dict[str, str] = {"image": "<image>"}  # kind -> its placeholder as written in prompts
    config_arguments: tuple[str, ...] = ()  # forward arguments DyMU takes from the config only
    lmms_name: Optional[str] = None  # its lmms-eval model name, if it has one
    lmms_class: str = ""  # the name of that model's class in dymu_viz.eval.harness
    default_pretrained: Optional[str] = None  # the lmms-eval model's default checkpoint
    lmms_system_prompt: Optional[str] = None  # a system turn lmms-eval's own model of the family writes
    lmms_max_new_tokens: int = 1024  # that model's answer length when the task sets none
    presets: dict[str, str] = {}  # lmms-eval thresholds=NAME -> a published reference checkpoint
    baselines: bool = False  # the matched-budget ToMe / pooling / random baselines apply (``baseline_grids``)
    baseline_counts_by_size: bool = True  # a baseline's count depends on an image's processed size alone
    rounds: bool = False  # merges in rounds after its tower, calibrated by ``calibrate_rounds``
    checkpoints: dict[str, VLMSpec] = {}  # the ids ``load_vlm`` knows, with their real shapes
    model_types: dict[str, str] = {}  # HF config model_type -> the class it loads (``from_pretrained``)

    def configure(self, model: nn.Module, thresholds: Any, mode: str, options: dict[str, Any]) -> Any:
        """Validate ``patch_vlm``'s thresholds (or baseline) and family options for ``mode``, patch
        the tower, and return the settings ``encode`` reads (kept in ``model.dymu_vlm``). Options
        this family does not take must be refused with a clear error."""
        raise NotImplementedError

    def unpatch(self, model: nn.Module) -> None:
        """Undo what ``configure`` did to the tower."""

    def encode(self, model: nn.Module, settings: Any, visual: VisualInput, arguments: dict[str, Any]) -> list[ImageTokens]:
        """Every item of ``visual`` in the forward's ``arguments`` as compact tokens, in order."""
        raise NotImplementedError

    def positions(self, model: nn.Module, input_ids: Tensor, mask: Tensor, start: Tensor,
                  arguments: dict[str, Any]) -> Optional[Tensor]:
        """(3, B, L) RoPE positions of a prompt's tokens as the unpatched model numbers them (each
        row continuing at ``start`` (B,)), or None when RoPE follows the token order (1-D)."""
        return None

    def llm_arguments(self, chunk: Any) -> dict[str, Any]:
        """Extra arguments of the language model's call for a forward's compact ``chunk`` (a
        ``vlm.chunk.Chunk``), e.g. features its first layers add at the image rows. None here."""
        return {}

    def item_lengths(self, model: nn.Module, visual: VisualInput, arguments: dict[str, Any]) -> list[int]:
        """How many placeholders each item of ``visual`` takes in the prompts (the processor's
        expansion). Default: all items alike (one image, one fixed-size grid)."""
        pixels = arguments[visual.pixels]
        total = int((arguments["input_ids"] == getattr(model.config, visual.token)).sum())
        return [total // max(len(pixels), 1)] * len(pixels)

    def item_rows(self, model: nn.Module, visual: VisualInput, arguments: dict[str, Any]) -> list[int]:
        """How many rows of ``visual.pixels`` each item takes (for ``generate``'s per-sample
        expansion): t * h * w patch rows per item when pixels are patch rows (``visual.grid``),
        else one per item."""
        if visual.grid:
            return arguments[visual.grid].prod(-1).tolist()
        return [1] * len(arguments[visual.pixels])

    def build_random(self, spec: VLMSpec, vision_layers: Optional[int], text_layers: int,
                     text_width: int) -> tuple[nn.Module, Any, str]:
        """A random initialisation of ``spec``'s classes (the tower at its real shape, the first
        ``vision_layers`` of its blocks; the LLM scaled down to ``text_layers`` x ``text_width``),
        its stand-in processor, and a note of the shapes that ran (``dymu_viz.vlm.standin``)."""
        raise NotImplementedError

    def calibrate_rounds(self, model: nn.Module, processor: Any, images: Any, keep: float, rounds: int,
                         batch_size: int, **options: Any) -> Any:
        """Thresholds of the rounds after the tower, found on ``images`` (families with ``rounds``)."""
        raise NotImplementedError(f"the {self.name} family merges inside its tower: calibrate the tower instead")

    def baseline_grids(self, model: nn.Module, processor: Any, images: list[Any]) -> list[tuple[int, int]]:
        """(rows, columns) of the grid the matched-budget baselines reduce, for each of ``images``
        as ``processor`` prepares it (families with ``baselines``)."""
        raise NotImplementedError(f"the {self.name} family has no matched-budget baselines")

    def baseline_steps(self, model: nn.Module) -> tuple[int, int]:
        """(steps that merge, all steps) over which ToMe's merges are spread: tower layers the
        LLM reads and the tower's depth, or rounds."""
        raise NotImplementedError(f"the {self.name} family has no matched-budget baselines")

    def vision_flops(self, model: nn.Module, inputs: dict[str, Any], accounting: dict[str, Any]) -> Optional[float]:
        """FLOPs of the tower's pass over ``inputs`` (a batch of one) with ``accounting`` (its
        ``model.dymu_vlm.last`` entry), when the family counts them; None here."""
        return None

    def item_inputs(self, inputs: dict[str, Any], first: int, count: int) -> dict[str, Any]:
        """The per-image arguments of images ``first`` .. ``first + count`` of a batch's ``inputs``
        (what ``vision_flops`` reads for one sample's images); none here."""
        return {}

    def lmms_pictures(self, model: nn.Module, images: list[Any]) -> list[Any]:
        """Pictures as lmms-eval's own model of the family hands them to the processor."""
        return images

    def lmms_processor_options(self, min_pixels: int, max_pixels: int) -> dict[str, Any]:
        """Processor call options of lmms-eval's own model of the family (pixel bounds it loads with)."""
        return {}

    def placeholder(self, kind: str) -> str:
        return self.placeholders.get(kind, f"<{kind}>")


FAMILIES: dict[str, VLMFamily] = {}  # name -> family, in registration order
_BY_CLASS: dict[str, VLMFamily] = {}


def register(family: VLMFamily) -> VLMFamily:
    """Add a family to the registry (each family module does so once, at import)."""
    FAMILIES[family.name] = family
    for name in family.classes:
        _BY_CLASS[name] = family
    return family


def family_of(model: nn.Module) -> VLMFamily:
    """The family serving ``model`` (by its class before any DyMU patch), or a clear error.
    (``dymu_viz.vlm`` imports every family module, which registers itself.)"""
    name = classswap.base_class(model).__name__
    if name not in _BY_CLASS:
        raise TypeError(f"expected one of {', '.join(_BY_CLASS)} (the classes of dymu_viz.vlm's families), got {name}")
    return _BY_CLASS[name]


def family_named(name: str) -> VLMFamily:
    """A registered family by its name."""
    if name not in FAMILIES:
        raise ValueError(f"unknown VLM family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]
