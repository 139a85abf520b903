"""dymu_viz: DyMU (dynamic token merging + virtual token unmerging) for open_clip, timm and
HF transformers vision encoders, with visualizers and notebooks."""

from .encoder import EncoderResult, MergeConfig
from .patch import DyMUState, encode, patch, unpatch
from .schedule import kout_r_total, make_schedule, parse_r, token_counts
from .thresholds import Thresholds

__version__ = "0.1.0"

__all__ = [
    "DyMUState", "EncoderResult", "MergeConfig", "Thresholds", "encode", "kout_r_total",
    "make_schedule", "parse_r", "patch", "token_counts", "unpatch",
]
