"""DyMU in vision-language models: DToMe in the vision tower, VTU in the RoPE LLM."""

from .cache import DyMUCache
from .common import ImageTokens
from .models import LoadedVLM, load_vlm
from . import baselines, costs, pipeline, qwen
from .pipeline import MODES, GenerateOutput, VLMState, chat, generate, logits, patch_vlm, unpatch_vlm

__all__ = ["MODES", "DyMUCache", "GenerateOutput", "ImageTokens", "LoadedVLM", "VLMState", "chat", "generate", "load_vlm",
           "logits", "patch_vlm", "unpatch_vlm"]
