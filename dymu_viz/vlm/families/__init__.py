"""The VLM families, one module each; importing this package registers every one of them
(``dymu_viz.vlm.family``). A new family is one more module here, imported below."""

from . import internvl, llava, onevision, qwen2_vl, qwen3_vl  # noqa: F401
