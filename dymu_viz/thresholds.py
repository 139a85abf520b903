"""``Thresholds``: per-layer DToMe thresholds with the schedule and provenance that made them.

Saved as JSON. The reference repository's ``.pth`` threshold checkpoints (``{"name",
"state_dict"}`` with one 0-dim ``...threshold`` buffer per block) can be imported.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .schedule import kout_r_total, make_schedule

FORMAT = "dymu_viz.thresholds/1"

# The three key layouts of reference checkpoints (spec section 3.3), by block index.
_REFERENCE_KEYS = (
    re.compile(r"^(?:module\.)?visual\.transformer\.resblocks\.(\d+)\.threshold$"),
    re.compile(r"^(?:module\.)?visual\.trunk\.blocks\.(\d+)\.threshold$"),
    re.compile(r"^(?:module\.)?vision_model\.encoder\.layers\.(\d+)\.threshold$"),
)

# Thresholds the reference authors printed in their inference scripts (dymu-spec section 3.3), by
# the reference checkpoint name. "ViT-L-14-336-tome-72out" is OpenAI CLIP ViT-L/14-336, the tower of
# LLaVA-1.5 (the same weights as HF's openai/clip-vit-large-patch14-336): the paper's DyMU-low.
PUBLISHED = {
    "ViT-L-14-336-tome-72out": [
        0.99609375, 0.97265625, 0.94140625, 0.91015625, 0.87890625, 0.87890625, 0.87890625, 0.84765625,
        0.84765625, 0.87890625, 0.84765625, 0.84765625, 0.87890625, 0.87890625, 0.91015625, 0.91015625,
        0.91015625, 0.91015625, 0.94140625, 0.87890625, 0.87890625, 0.97265625, 0.99609375, 0.81640625],
}


class ThresholdsFileRefused(pickle.UnpicklingError, ValueError):
    """A thresholds checkpoint that only an unsafe load could read (it would run code)."""


@dataclass
class Thresholds:
    """values[i] = tau_i; r[i] = scheduled merges of layer i (0 = layer never merges)."""

    values: list[float]
    r: list[int]
    model: str = ""
    schedule: str = "constant"
    r_total: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = [float(v) for v in self.values]
        self.r = [int(v) for v in self.r]
        if len(self.values) != len(self.r):
            raise ValueError(f"{len(self.values)} thresholds but {len(self.r)} schedule entries; they must match")
        if any(math.isnan(v) for v in self.values):
            raise ValueError("a threshold is NaN; the calibration that produced it is broken")

    @property
    def layers(self) -> int:
        return len(self.values)

    def check_depth(self, layers: int) -> None:
        if self.layers != layers:
            name = f" ({self.model})" if self.model else ""
            hint = "use thresholds calibrated for this encoder"
            if self.layers > layers:
                hint += (f"; if the encoder is the calibrated one with its last {self.layers - layers} layer(s) "
                         f"removed (LLaVA-OneVision's SO400M tower keeps 26 of 27), use .truncated({layers}): "
                         "the reference uses the first thresholds the same way")
            raise ValueError(f"these thresholds{name} have {self.layers} layers but the encoder has {layers}; {hint}")

    def truncated(self, layers: int) -> "Thresholds":
        """The thresholds of the first ``layers`` layers, for a tower that keeps only its first
        blocks (LLaVA-OneVision deletes SO400M's last layer; the reference then ignores the
        last threshold). The metadata records which layers are used."""
        if not 0 < layers <= self.layers:
            raise ValueError(f"cannot keep {layers} of {self.layers} layers")
        metadata = {**self.metadata, "layers_used": f"0-{layers - 1} of {self.layers}"}
        return Thresholds(self.values[:layers], self.r[:layers], self.model, self.schedule, self.r_total, metadata)

    @classmethod
    def published(cls, name: str = "ViT-L-14-336-tome-72out") -> "Thresholds":
        """Thresholds printed by the reference authors (``PUBLISHED``), with the schedule their
        checkpoint name implies (72out: r = 21 in each of the 24 layers)."""
        if name not in PUBLISHED:
            raise ValueError(f"no published thresholds named {name!r}; known: {', '.join(PUBLISHED)}")
        values = PUBLISHED[name]
        return cls(values, _reference_r(name, len(values), None, None), model=name, schedule=_schedule_from_name(name),
                   metadata={"source": "published by the reference authors (inference_openai_clip.py)"})

    @classmethod
    def uniform(cls, value: float, layers: int, **kwargs: Any) -> "Thresholds":
        """The same tau in every layer, every layer allowed to merge."""
        return cls([value] * layers, [1] * layers, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Any) -> "Thresholds":
        """Thresholds from ``to_dict``'s layout, every field type-checked (a file's content is not
        trusted: a string or a boolean is not a number, a fractional r is not a count)."""
        if not isinstance(data, dict):
            raise ValueError(f"not a dymu_viz thresholds file (a JSON object expected, found {type(data).__name__})")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a dymu_viz thresholds file (format {data.get('format')!r}, expected {FORMAT!r})")
        for key in ("values", "r"):
            if key not in data:
                raise ValueError(f"a thresholds file needs {key!r}")
        fields = {"values": _numbers(data["values"], "values", float), "r": _numbers(data["r"], "r", int)}
        for key, kind in (("model", str), ("schedule", str), ("metadata", dict)):
            if key in data:
                if not isinstance(data[key], kind):
                    raise ValueError(f"{key!r} must be a {kind.__name__}, found {type(data[key]).__name__}")
                fields[key] = data[key]
        if data.get("r_total") is not None:
            fields["r_total"] = _numbers([data["r_total"]], "r_total", int)[0]
        return cls(**fields)

    def save(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Thresholds":
        """A thresholds JSON file or a reference checkpoint, told apart by their content (a torch
        checkpoint is a zip archive or a pickle), whatever the file is called."""
        path = Path(path)
        raw = path.read_bytes()
        if raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80":
            return cls.from_reference_checkpoint(path)
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is neither a thresholds JSON file nor a torch checkpoint: {err}") from None
        return cls.from_dict(data)

    def save_reference_checkpoint(self, path: Union[str, Path], prefix: str) -> Path:
        """Write the reference repository's layout: {"name", "state_dict": {"module.<prefix>.<i>.threshold"}}
        (prefix e.g. "visual.transformer.resblocks"), loadable by its code and by ours."""
        import torch

        state = {f"module.{prefix}.{i}.threshold": torch.tensor(v) for i, v in enumerate(self.values)}
        torch.save({"name": self.model, "state_dict": state}, str(path))
        return Path(path)

    @classmethod
    def from_reference_checkpoint(cls, path: Union[str, Path], n_patches: Optional[int] = None,
                                  schedule: Optional[str] = None) -> "Thresholds":
        """Import a reference ``.pth`` threshold checkpoint (loaded with weights_only=True).

        The schedule (which layers may merge) comes from the checkpoint's name, e.g.
        "ViT-L-14-336-tome-72out-linear"; n_patches is read from the name too unless given.
        Without a recognisable "Kout" in the name every layer may merge.
        """
        import torch

        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # weights_only refused an object: nothing of it ran
            raise ThresholdsFileRefused(f"{path} holds objects beyond tensors and plain data, which would run "
                                        f"code when loaded; refused (torch.load weights_only): {err}") from None
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path} is not a threshold checkpoint (found {type(ckpt).__name__}, not a dict)")
        state = ckpt.get("state_dict", ckpt)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: its state_dict is a {type(state).__name__}, not a dict")
        found: dict[int, float] = {}
        for key, value in state.items():
            for pattern in _REFERENCE_KEYS:
                match = pattern.match(key) if isinstance(key, str) else None
                if match:
                    if not (isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)) or \
                            (isinstance(value, torch.Tensor) and value.numel() != 1):
                        raise ValueError(f"{path}: {key} must be one number, found {type(value).__name__}")
                    found[int(match.group(1))] = float(value)
        if not found:
            raise ValueError(f"{path} holds no '...threshold' entries in any known layout")
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"{path}: threshold entries for blocks {sorted(found)} are not contiguous from 0")
        values = [found[i] for i in range(len(found))]
        name = str(ckpt.get("name", ""))
        return cls(values, _reference_r(name, len(values), n_patches, schedule), model=name,
                   schedule=schedule or _schedule_from_name(name), r_total=None,
                   metadata={"source": "reference checkpoint", "file": Path(path).name})


def _numbers(values: Any, key: str, kind: type) -> list:
    """A file's list of numbers (``kind`` int: whole numbers only), or a ValueError naming ``key``."""
    if not isinstance(values, list):
        raise ValueError(f"{key!r} must be a list of numbers, found {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise ValueError(f"{key!r} must hold {'whole numbers' if kind is int else 'numbers'}, found {v!r}")
        try:
            out.append(kind(v))
        except OverflowError:
            raise ValueError(f"{key!r} holds a number too large for a float: {str(v)[:20]}...") from None
    return out


def _schedule_from_name(name: str) -> str:
    if re.search(r"reverse[-_]linear", name):
        return "reverse_linear"
    return "linear" if re.search(r"[-_]linear", name) else "constant"


def _patches_from_name(name: str) -> Optional[int]:
    """Patch count from names like ViT-L-14-336, ViT-B-16-SigLIP-384, siglip-so400m-patch14-384."""
    match = re.search(r"(?:patch|-)(\d{1,2})-(?:[A-Za-z0-9]+-)?(\d{3})", name)
    if not match:
        return None
    patch, size = int(match.group(1)), int(match.group(2))
    return (size // patch) ** 2 if patch else None


def _reference_r(name: str, layers: int, n_patches: Optional[int], schedule: Optional[str]) -> list[int]:
    if re.search(r"no[-_]?merge", name):  # r_total 0: its stored 1.0 placeholders must never merge
        return [0] * layers
    kout = re.search(r"(\d+)out", name)
    n_patches = n_patches or _patches_from_name(name)
    if kout is None or n_patches is None:
        return [1] * layers
    r_total = kout_r_total(kout.group(0), n_patches)
    return make_schedule(r_total, layers, schedule or _schedule_from_name(name))
