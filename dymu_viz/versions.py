"""Which torch and transformers releases dymu_viz supports, and clear refusals of the others.

* Below the floor (``MINIMUM``, what CI's floor leg tests) ``import dymu_viz`` fails with an
  ImportError that names the minimum, before any HF code can fail deep inside.
* The VLM path leans on HF internals (the attention interface, ``_expand_inputs_for_generation``,
  ``get_rope_index``, the cache classes) that change between minor releases; a mismatch can give
  wrong tokens with no error, so ``patch_vlm`` refuses a transformers release outside
  ``TESTED_TRANSFORMERS`` unless the user asks to run it anyway.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Mapping, Optional

MINIMUM = {"torch": "2.11", "transformers": "5.19"}  # the floor leg of CI runs on exactly these
TESTED_TRANSFORMERS = ("5.19", "5.20", "5.21", "5.22", "5.23", "5.24", "5.25")  # minor releases the VLM suite passes on
UNTESTED_OK = "DYMU_VIZ_UNTESTED_TRANSFORMERS"  # set to 1 to run on another release anyway
KNOWN = {  # what the suite measured on neighbouring releases
    "5.17": "HF's own beam search repeats each image beam by beam when a prompt holds several (fixed in 5.19)",
    "5.18": "HF's own beam search repeats each image beam by beam when a prompt holds several (fixed in 5.19)",
}


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.11.0+cu130" -> (2, 11, 0)."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def installed(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_minimums(found: Optional[Mapping[str, Optional[str]]] = None) -> None:
    """Raise an ImportError naming the minimum when torch or transformers (``found``: package ->
    version, default: the installed distributions) is older than ``MINIMUM``."""
    found = {p: installed(p) for p in MINIMUM} if found is None else found
    old = [(p, v) for p, v in found.items() if v is not None and release(v) < release(MINIMUM[p])]
    if old:
        raise ImportError("dymu_viz needs " + " and ".join(f"{p}>={MINIMUM[p]} (found {v})" for p, v in old)
                          + "; upgrade with pip install " + " ".join(f"'{p}>={MINIMUM[p]}'" for p, _ in old))


def check_transformers(version: str | None = None) -> None:
    """Raise a RuntimeError naming the tested releases when ``version`` (default: the installed
    transformers) is not one of them, unless the environment variable ``UNTESTED_OK`` is 1."""
    import transformers  # at call time: the module registered now (some packages rebuild HF's lazy module)

    version = version or transformers.__version__
    minor = ".".join(version.split(".")[:2])
    if minor in TESTED_TRANSFORMERS or os.environ.get(UNTESTED_OK) == "1":
        return
    known = f" (measured on {minor}: {KNOWN[minor]})" if minor in KNOWN else ""
    first, last = TESTED_TRANSFORMERS[0], release(TESTED_TRANSFORMERS[-1])
    raise RuntimeError(f"dymu_viz's VLM path is tested with transformers {first}.x to {TESTED_TRANSFORMERS[-1]}.x, not "
                       f"{version}{known}. Install a tested release (pip install 'transformers>={first},"
                       f"<{last[0]}.{last[1] + 1}') or set {UNTESTED_OK}=1 to run anyway at your own risk")
