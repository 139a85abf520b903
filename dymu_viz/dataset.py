"""Image sets for calibration: the reference JSON list (``[{"image": "rel/path.jpg"}, ...]``)
or a plain folder of images. Unreadable images never stop a run: they are reported back."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_images(source: Union[str, Path], image_root: Optional[Union[str, Path]] = None) -> tuple[list[Path], int]:
    """Image paths of a JSON list (entries without "image" are skipped) or of a folder
    (recursively, sorted). Returns (paths, skipped JSON entries)."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {source}")
        return paths, 0
    if not source.is_file():
        raise FileNotFoundError(f"dataset {source} is neither a JSON file nor a folder")
    try:
        entries = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{source} must hold a JSON list of {{\"image\": relative path}} entries")
    root = Path(image_root) if image_root is not None else source.parent
    paths = [root / e["image"] for e in entries if isinstance(e, dict) and isinstance(e.get("image"), str)]
    if not paths:
        raise ValueError(f"{source} lists no entries with an \"image\" key; nothing to calibrate on")
    return paths, len(entries) - len(paths)


@contextmanager
def _whole_files_only() -> Iterator[None]:
    """PIL refuses truncated files while open, even where another library made it accept them
    process-wide (lmms-eval sets ``ImageFile.LOAD_TRUNCATED_IMAGES`` on import): a truncated
    image must be skipped and named, not calibrated on half grey."""
    allowed = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = allowed


def load_rgb(path: Union[str, Path]) -> Image.Image:
    """Open any image as 8-bit RGB: EXIF rotation applied; grayscale, 16-bit, float (0..1 when
    it fits there), palette and alpha images converted (transparent areas, an alpha channel or
    a transparent colour, composited on white). A truncated file raises."""
    with Image.open(path) as image, _whole_files_only():
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else \
            1.0 if image.mode == "F" and array.max() <= 1 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8))
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


@dataclass
class Sample:
    index: int
    pixels: Optional[torch.Tensor]
    error: Optional[str]


class ImageSet(torch.utils.data.Dataset):
    """Preprocessed images by index; a failure gives ``pixels=None`` and the reason."""

    def __init__(self, paths: list[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        try:
            return Sample(index, self.transform(load_rgb(self.paths[index])), None)
        except Exception as err:  # a bad image must never stop a long run
            return Sample(index, None, f"{type(err).__name__}: {err}")


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Stack the good images; keep indices of good ones and (index, reason) of bad ones."""
    good = [s for s in samples if s.pixels is not None]
    return {
        "indices": [s.index for s in good],
        "pixels": torch.stack([s.pixels for s in good]) if good else None,
        "failures": [(s.index, s.error) for s in samples if s.pixels is None],
    }
