"""DyMU in vision-language models: DToMe in the vision tower, VTU in the RoPE LLM.

One module per model family under ``families/`` (each registers itself with ``family``); the
pipeline asks the model's family for everything that differs between them."""

from . import families  # noqa: F401  (registers every family)
from .cache import DyMUCache
from .family import FAMILIES, VLMFamily, family_of
from .models import LoadedVLM, load_vlm
from .tokens import ImageTokens
from . import baselines, costs, internvl, pipeline, qwen  # noqa: F401  (as attributes)
from .families import qwen_tower as unit_tower  # noqa: F401  (vlm.unit_tower)
from .pipeline import (MODES, GenerateOutput, VLMState, chat, encode_images, generate, logits, patch_vlm,
                       prompt_inputs, unpatch_vlm)

__all__ = ["FAMILIES", "MODES", "DyMUCache", "GenerateOutput", "ImageTokens", "LoadedVLM", "VLMFamily", "VLMState",
           "chat", "encode_images", "family_of", "generate", "load_vlm", "logits", "patch_vlm", "prompt_inputs",
           "unpatch_vlm"]
