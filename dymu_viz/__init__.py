"""dymu_viz: DyMU (dynamic token merging + virtual token unmerging) for open_clip, timm and
HF transformers vision encoders, with visualizers and notebooks."""

from .versions import check_minimums

check_minimums()  # before anything imports torch's or HF's internals: an old release fails here, by name

from .calibrate import calibrate, find_thresholds
from .data import calibration_photos, sample_photos, shapes_image
from .encoder import EncoderResult, MergeConfig
from .models import load_encoder, load_tokenizer
from .patch import DyMUState, encode, get_state, patch, unpatch
from .schedule import kout_r_total, make_schedule, parse_r, token_counts
from .thresholds import Thresholds

__version__ = "0.1.0"

__all__ = [
    "DyMUState", "EncoderResult", "MergeConfig", "Thresholds", "calibrate", "calibration_photos", "encode", "find_thresholds",
    "get_state", "kout_r_total", "load_encoder", "load_tokenizer", "make_schedule", "parse_r", "patch",
    "sample_photos", "shapes_image", "token_counts", "unpatch",
]
