"""Threshold finding (spec section 3.2).

Per layer, on the tokens surviving earlier layers, the B*r_i best edges of the whole batch are
merged and the best edge *not* merged is that batch's value for the layer. A layer's threshold
is the mean of its batch values over all batches that produced one (explicit counts, no
sentinel).

The data set is cut into global batches in its own order: batch j holds images
[j*B, (j+1)*B). Under ``torchrun`` batch j goes to rank j % world_size, and at the end the
per-batch values are gathered and averaged in batch order, so the thresholds do not depend on
the number of processes. Finished batches are checkpointed, so an interrupted run resumed
(even with another process count) ends with exactly the thresholds of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from .encoder import MergeConfig
from .patch import DyMUState, get_state, patch
from .schedule import kout_r_total, make_schedule
from .thresholds import Thresholds

BatchValues = list[Optional[float]]  # one batch's value per layer (None: no edge left unpicked)


def resolve_r(depth: int, n_patches: int, r_total: Optional[int] = None, target: Optional[str] = None,
              schedule: str = "constant") -> tuple[int, list[int]]:
    """(r_total, per-layer r) from either r_total or a "Kout" target such as "72out"."""
    if (r_total is None) == (target is None):
        raise ValueError("give exactly one of r_total or target (e.g. target='72out')")
    if target is not None:
        r_total = kout_r_total(target, n_patches)
    if not 0 <= r_total < n_patches:
        raise ValueError(f"r_total {r_total} is not possible with {n_patches} patches: give 0 to {n_patches - 1} "
                         f"merges (at least one patch token stays)")
    return r_total, make_schedule(r_total, depth, schedule)


def encoder_state(model: nn.Module) -> DyMUState:
    """The patched encoder inside model (patching it, merging off, if needed)."""
    return get_state(model) or get_state(patch(model))


def n_patches_of(state: DyMUState, pixels: Optional[Tensor] = None) -> int:
    """Patches per image: of ``pixels`` (B, 3, H, W) when given, else of the size the encoder
    expects. An encoder that takes any size (timm's dynamic_img_size) needs the pixels."""
    if pixels is not None:
        gh, gw = state.adapter.grid(pixels)
        return gh * gw
    size = state.adapter.expected_size()
    if size is None:
        raise ValueError(f"the {state.adapter.family} encoder takes images of any size, so a target has no fixed "
                         "number of patches here; calibrate on pixel batches (find_thresholds), whose size sets it")
    (h, w), (ph, pw) = size, state.adapter.patch_size()
    return (h // ph) * (w // pw)


@torch.no_grad()
def batch_thresholds(model: nn.Module, pixels: Tensor, r: Sequence[int]) -> tuple[BatchValues, Tensor]:
    """One calibration step: (per-layer batch values, (B,) output token counts)."""
    result = encoder_state(model).run(pixels, config=MergeConfig("calibrate", None, list(r)))
    return result.batch_thresholds, result.n_tokens


def mean_thresholds(per_batch: dict[int, BatchValues], layers: int) -> tuple[list[float], list[int]]:
    """Per-layer mean over batches in batch order (incremental form m += (v - m) / c, exact
    when all values are equal); layers with no value get +inf ("never merge").
    Returns (thresholds, number of batches behind each)."""
    means, counts = [0.0] * layers, [0] * layers
    for j in sorted(per_batch):
        for i, v in enumerate(per_batch[j]):
            if v is not None:
                counts[i] += 1
                means[i] += (v - means[i]) / counts[i]
    return [m if c else float("inf") for m, c in zip(means, counts)], counts


def find_thresholds(model: nn.Module, batches: Iterable[Tensor], r_total: Optional[int] = None,
                    target: Optional[str] = None, schedule: str = "constant", name: str = "") -> Thresholds:
    """Calibrate thresholds of ``model``'s encoder over an in-memory iterable of pixel batches."""
    state = encoder_state(model)
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibration got no images; check the dataset")
    n_patches = n_patches_of(state, first)
    r_total, rs = resolve_r(state.depth, n_patches, r_total, target, schedule)
    per_batch, n_images = {}, 0
    for j, pixels in enumerate(chain([first], batches)):
        if n_patches_of(state, pixels) != n_patches:
            raise ValueError(f"calibration batch {j} has {tuple(pixels.shape[-2:])} images, batch 0 "
                             f"{tuple(first.shape[-2:])}; the per-layer merges are set for one image size")
        per_batch[j], _ = batch_thresholds(model, pixels, rs)
        n_images += pixels.shape[0]
    if n_images == 0:
        raise ValueError("calibration got no images; check the dataset")
    values, counts = mean_thresholds(per_batch, state.depth)
    return Thresholds(values, rs, model=name, schedule=schedule, r_total=r_total,
                      metadata={"n_images": n_images, "n_batches": len(per_batch), "batches_per_layer": counts})


@dataclass
class Progress:
    """What a run has finished: per-batch values, images used, bad images (index, reason)."""

    per_batch: dict[int, BatchValues] = field(default_factory=dict)
    n_images: dict[int, int] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    merges: dict[int, list[int]] = field(default_factory=dict)  # per batch, the merges of each step (rounds)

    def merge(self, other: "Progress") -> None:
        self.per_batch.update(other.per_batch)
        self.n_images.update(other.n_images)
        self.merges.update(other.merges)
        known = {i for i, _ in self.failures}
        self.failures += [(i, e) for i, e in other.failures if i not in known]

    def to_json(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        return {"fingerprint": fingerprint, "per_batch": {str(j): v for j, v in self.per_batch.items()},
                "n_images": {str(j): n for j, n in self.n_images.items()}, "failures": self.failures,
                "merges": {str(j): m for j, m in self.merges.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Progress":
        return cls({int(j): v for j, v in data["per_batch"].items()}, {int(j): n for j, n in data["n_images"].items()},
                   [(int(i), str(e)) for i, e in data["failures"]],
                   {int(j): m for j, m in data.get("merges", {}).items()})


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_digest(model: nn.Module) -> str:
    """A short digest of what a model computes with: its module classes (QuickGELU or GELU), its
    parameters' names and shapes and the first 64 values of each (other weights), so that a
    resumed calibration refuses checkpoints of another model. Cheap on any size of model."""
    digest = hashlib.sha256()
    for name, module in model.named_modules():
        digest.update(f"{name}:{type(module).__name__};".encode())
    for name, param in model.named_parameters():
        digest.update(f"{name}{tuple(param.shape)};".encode())
        if param.device.type != "meta":  # offloaded by accelerate: its shape still counts
            digest.update(param.detach().flatten()[:64].double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def images_digest(images: Sequence[Any]) -> str:
    """A short digest of an image list in its order: each file's resolved path, or an in-memory
    image's size and pixels, so that a resumed calibration refuses another image set."""
    digest = hashlib.sha256()
    for image in images:
        if hasattr(image, "tobytes"):
            digest.update(f"{image.mode}{image.size};".encode())
            digest.update(image.tobytes())
        else:
            digest.update(f"{Path(image).resolve()};".encode())
    return digest.hexdigest()[:16]


def checkpoint_paths(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".partial.rank*.json"))


def remove_checkpoints(out: Path) -> None:
    """Delete the per-rank checkpoints of the calibration that writes ``out``: once its result
    is saved, or to start it afresh."""
    for path in checkpoint_paths(out):
        path.unlink(missing_ok=True)


def load_checkpoints(out: Path, fingerprint: dict[str, Any]) -> Progress:
    """Everything earlier (possibly killed) runs of the same calibration finished, any ranks."""
    progress = Progress()
    for path in checkpoint_paths(out):
        data = json.loads(path.read_text())
        if data["fingerprint"] != fingerprint:
            raise ValueError(f"{path} belongs to a different calibration ({data['fingerprint']}); "
                             f"use --overwrite to start afresh")
        progress.merge(Progress.from_json(data))
    return progress


def dist_info() -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str) -> str:
    """This process's device: "cuda" means this rank's GPU under torchrun (``LOCAL_RANK``), and a
    CUDA device is made current, so that NCCL's collectives run on it (not all ranks on GPU 0)."""
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return device


def gather_objects(obj: Any) -> list[Any]:
    """The obj of every rank (a list of one without torch.distributed)."""
    import torch.distributed as dist
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def global_batches(n: int, batch_size: int) -> list[list[int]]:
    """The data set's batches in order: batch j = images [j*B, (j+1)*B)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def _loader(paths: Sequence[Path], transform: Any, batches: list[list[int]], workers: int):
    from .dataset import ImageSet, collate
    return torch.utils.data.DataLoader(ImageSet(list(paths), transform), batch_sampler=batches,
                                       collate_fn=collate, num_workers=workers)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


@dataclass
class CalibrationJob:
    """A data-set calibration: what to run and where its results and checkpoints go."""

    model: nn.Module
    transform: Any
    paths: list[Path]
    r: list[int]
    out: Path
    batch_size: int = 64
    name: str = ""
    schedule: str = "constant"
    r_total: Optional[int] = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    workers: int = 2
    checkpoint_every: int = 20
    resume: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        for name, least in (("batch_size", 1), ("checkpoint_every", 1), ("workers", 0)):
            if int(getattr(self, name)) < least:
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")

    def fingerprint(self) -> dict[str, Any]:
        """What the batch values depend on; checkpoints of a run with another one are refused."""
        return {"model": self.name, "weights": model_digest(self.model), "r": self.r, "batch_size": self.batch_size,
                "n_paths": len(self.paths), "images": images_digest(self.paths), "dtype": str(self.dtype)}


def run_calibration(job: CalibrationJob) -> tuple[Thresholds, Progress]:
    """Calibrate over job.paths (this process's share under torchrun), with checkpoints."""
    rank, world = dist_info()
    layers = encoder_state(job.model).depth
    fingerprint = job.fingerprint()
    done = load_checkpoints(job.out, fingerprint) if job.resume else Progress()
    batches = global_batches(len(job.paths), job.batch_size)
    mine = [j for j in range(len(batches)) if j % world == rank and j not in done.per_batch]
    local = Progress()
    local.merge(done)
    checkpoint = job.out.with_name(job.out.name + f".partial.rank{rank}.json")
    bar = _bar(sum(len(batches[j]) for j in mine), f"calibrating (rank {rank}/{world})" if world > 1 else "calibrating",
               job.progress_bar and rank == 0)
    tokens_sum = tokens_n = 0
    delay = float(os.environ.get("DYMU_VIZ_BATCH_DELAY", "0"))  # seconds per batch; lets tests interrupt a run
    for k, (j, batch) in enumerate(zip(mine, _loader(job.paths, job.transform, [batches[j] for j in mine], job.workers))):
        local.failures += [f for f in batch["failures"] if f[0] not in {i for i, _ in local.failures}]
        if batch["pixels"] is None:
            local.per_batch[j], local.n_images[j] = [None] * layers, 0
        else:
            values, n_tokens = batch_thresholds(job.model, batch["pixels"].to(job.device, job.dtype), job.r)
            local.per_batch[j], local.n_images[j] = values, len(batch["indices"])
            tokens_sum, tokens_n = tokens_sum + int(n_tokens.sum()), tokens_n + len(n_tokens)
        bar.update(len(batches[j]))
        bar.set_postfix(tokens=f"{tokens_sum / max(tokens_n, 1):.1f}", bad=len(local.failures))
        if (k + 1) % job.checkpoint_every == 0:
            write_atomic(checkpoint, json.dumps(local.to_json(fingerprint)))
        if delay:
            time.sleep(delay)
    bar.close()
    write_atomic(checkpoint, json.dumps(local.to_json(fingerprint)))
    total = Progress()
    for part in gather_objects(local.to_json(fingerprint)):
        total.merge(Progress.from_json(part))
    if sum(total.n_images.values()) == 0:
        raise ValueError(f"no readable image among {len(job.paths)}; {len(total.failures)} failed to load")
    values, counts = mean_thresholds(total.per_batch, layers)
    thresholds = Thresholds(values, job.r, model=job.name, schedule=job.schedule, r_total=job.r_total, metadata={
        "n_images": sum(total.n_images.values()), "n_batches": len(total.per_batch), "batch_size": job.batch_size,
        "batches_per_layer": counts, "bad_images": len(total.failures), "processes": world, "dtype": str(job.dtype)})
    return thresholds, total


@torch.no_grad()
def token_report(model: nn.Module, thresholds: Thresholds, paths: Sequence[Path], transform: Any, batch_size: int,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, workers: int = 2,
                 progress_bar: bool = True, desc: str = "token counts") -> dict[str, Any]:
    """Output tokens per image with these thresholds (this process's share, gathered):
    mean ± std, min / median / max and histogram data."""
    import numpy as np

    from .patch import encode
    rank, world = dist_info()
    patch(model, thresholds)
    batches = global_batches(len(paths), batch_size)
    mine = [batches[j] for j in range(len(batches)) if j % world == rank]
    counts: dict[int, int] = {}
    bar = _bar(sum(map(len, mine)), desc, progress_bar and rank == 0)
    for batch in _loader(paths, transform, mine, workers):
        if batch["pixels"] is not None:
            n = encode(model, batch["pixels"].to(device, dtype)).n_tokens.tolist()
            counts.update(zip(batch["indices"], n))
        bar.update(len(batch["indices"]) + len(batch["failures"]))
    bar.close()
    for part in gather_objects(counts):
        counts.update(part)
    if not counts:
        raise ValueError("no readable image to report token counts on")
    values = np.array([counts[i] for i in sorted(counts)])
    hist, edges = np.histogram(values, bins=min(20, max(1, len(np.unique(values)))))
    return {"n_images": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": int(values.min()), "median": float(np.median(values)), "max": int(values.max()),
            "histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
            "per_image": {str(paths[i]): counts[i] for i in sorted(counts)}}


def calibrate(model: nn.Module, data: Any, transform: Any, target: Optional[str] = None,
              r_total: Optional[int] = None, schedule: str = "constant", batch_size: int = 64,
              image_root: Optional[Path] = None, out: Optional[Path] = None, resume: bool = False,
              device: str = "cpu", dtype: torch.dtype = torch.float32, workers: int = 2, name: str = "",
              progress_bar: bool = True) -> Thresholds:
    """Calibrate on an image set: a reference JSON list, a folder, or a list of image paths.

    With ``out`` the thresholds are saved there and the run checkpoints beside it (``resume``
    continues an interrupted run); bad images are skipped and listed in the metadata."""
    import tempfile

    from .dataset import list_images

    paths = [Path(p) for p in data] if isinstance(data, (list, tuple)) else list_images(data, image_root)[0]
    state = encoder_state(model)
    r_total, rs = resolve_r(state.depth, n_patches_of(state), r_total, target, schedule)
    with tempfile.TemporaryDirectory() as tmp:
        target_path = Path(out) if out is not None else Path(tmp) / "thresholds.json"
        job = CalibrationJob(model, transform, paths, rs, target_path, batch_size, name, schedule, r_total,
                             rank_device(device), dtype, workers, resume=resume, progress_bar=progress_bar)
        thresholds, progress = run_calibration(job)
        thresholds.metadata["bad_image_paths"] = [str(paths[i]) for i, _ in sorted(progress.failures)]
        if out is not None and dist_info()[0] == 0:
            thresholds.save(target_path)
            remove_checkpoints(target_path)
    return thresholds
