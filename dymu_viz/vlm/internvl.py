"""``dymu_viz.vlm.internvl``: the InternVL3 family's tiles, units, rounds, calibration and merge
maps, under a short name; the family lives in ``vlm/families/internvl.py``."""

from .families.internvl import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, PLACEMENTS, InternVLSettings, calibrate_rounds, internvl_items, item_tiles,
    round_tokens, standin_processor, tile_unit_maps, tile_units, tower_tokens, unit_patches, unit_raster, vision_units)
