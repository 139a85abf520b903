"""``dymu_viz.vlm.qwen``: the Qwen2-VL / Qwen2.5-VL family's rounds, calibration and M-RoPE
positions, under the name users know; the family lives in ``vlm/families/qwen2_vl.py``."""

from .families.qwen2_vl import (  # noqa: F401
    IMAGE_UNITS, METRICS, QWEN_FAMILIES, ROUNDS_KIND, RoundSettings, VIDEO_UNITS, calibrate_rounds,
    calibrate_temporal, calibration_rounds, concat_steps, full_attention_blocks, merge_rounds, merge_time_steps,
    metric_blocks, metric_views, padded_units, qwen_images, rope_positions, split_pieces, standin_processor,
    step_rows, token_types, tower_units, unit_grids, unit_metric_of, unit_round_thresholds, unit_rounds,
    window_order)
