"""DyMU in vision-language models: DToMe in the vision tower, VTU in the RoPE LLM."""

from .models import LoadedVLM, load_vlm
from .pipeline import GenerateOutput, PreparedInputs, chat, generate, logits, patch_vlm, prepare_inputs, unpatch_vlm

__all__ = ["GenerateOutput", "LoadedVLM", "PreparedInputs", "chat", "generate", "load_vlm", "logits", "patch_vlm",
           "prepare_inputs", "unpatch_vlm"]
