"""Which transformers releases the VLM path is tested with, and a clear refusal of the others.

The VLM path leans on HF internals (the attention interface, ``_expand_inputs_for_generation``,
``get_rope_index``, the cache classes) that change between minor releases; a mismatch can give
wrong tokens with no error, so an untested release is refused unless the user asks to run it.
"""

from __future__ import annotations

import os

TESTED_TRANSFORMERS = ("5.23",)  # minor releases the whole suite passes on
UNTESTED_OK = "DYMU_VIZ_UNTESTED_TRANSFORMERS"  # set to 1 to run on another release anyway
KNOWN = {  # what the suite measured on neighbouring releases
    "5.17": "multi-image beam search and right padding differ from the unpatched model in 11 of 183 VLM tests",
    "5.25": "generate gave wrong tokens with no error in most VLM tests",
}


def check_transformers(version: str | None = None) -> None:
    """Raise a RuntimeError naming the tested releases when ``version`` (default: the installed
    transformers) is not one of them, unless the environment variable ``UNTESTED_OK`` is 1."""
    import transformers  # at call time: the module registered now (some packages rebuild HF's lazy module)

    version = version or transformers.__version__
    minor = ".".join(version.split(".")[:2])
    if minor in TESTED_TRANSFORMERS or os.environ.get(UNTESTED_OK) == "1":
        return
    known = f" (measured on {minor}: {KNOWN[minor]})" if minor in KNOWN else ""
    raise RuntimeError(f"dymu_viz's VLM path is tested with transformers {', '.join(TESTED_TRANSFORMERS)}.x, not "
                       f"{version}{known}. Install the tested release (pip install transformers==5.23.0, which "
                       f"pip install dymu_viz pins) or set {UNTESTED_OK}=1 to run anyway at your own risk")
