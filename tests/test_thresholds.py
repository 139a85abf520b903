"""Thresholds: JSON round trip, validation, and import of the reference `.pth` checkpoints
(dymu-spec.md section 3.3: {"name", "state_dict"} with one 0-dim bf16 `...threshold` buffer
per block, DDP-prefixed "module.", whole model saved including the text tower)."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import torch

from dymu_viz import Thresholds
from dymu_viz.thresholds import PUBLISHED

# dymu-spec.md section 3.3: CLIP ViT-L/14-336 "72out" reference thresholds (24 layers)
CLIP_72OUT = PUBLISHED["ViT-L-14-336-tome-72out"]
# SigLIP ViT-B/16-384 reference thresholds (12 layers)
SIGLIP_B = [0.98046875, 0.90234375, 0.875, 0.8828125, 0.875, 0.8828125, 0.890625, 0.890625,
            0.8828125, 0.890625, 0.875, 0.875]
# dymu-spec.md section 3.1 table: ...siglip_384_tome_72out_linear
SIGLIP_B_504_LINEAR = [84, 77, 70, 63, 56, 49, 42, 35, 28, 0, 0, 0]
# 27 bf16-representable values (multiples of 1/256 in [0.5, 1))
SO400M = [(200 + 2 * i) / 256 for i in range(27)]

CLIP_KEY = "module.visual.transformer.resblocks.{}.threshold"
SIGLIP_KEY = "module.visual.trunk.blocks.{}.threshold"
OV_KEY = "module.vision_model.encoder.layers.{}.threshold"


def bf16(v: float) -> torch.Tensor:
    t = torch.tensor(v, dtype=torch.bfloat16)
    assert t.dim() == 0 and float(t) == v  # exactly representable
    return t


def unrelated_entries(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "module.transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g),
        "module.transformer.resblocks.0.ln_1.weight": torch.ones(4),
        "module.token_embedding.weight": torch.randn(10, 4, generator=g),
        "module.logit_scale": torch.tensor(4.6052),
        "module.visual.transformer.resblocks.0.attn.in_proj_weight": torch.randn(12, 4, generator=g),
        "module.visual.trunk.blocks.0.norm1.weight": torch.ones(4),
        "module.vision_model.encoder.layers.0.mlp.fc1.bias": torch.zeros(4),
        "module.visual.transformer.resblocks.0.threshold_count": torch.tensor(7.0),
    }


def write_checkpoint(path, name, key, values, extra=True):
    state = {key.format(i): bf16(v) for i, v in enumerate(values)}
    if extra:
        # unrelated keys interleaved before and after the threshold buffers
        state = {**unrelated_entries(), **state, "module.text_projection": torch.randn(4, 4)}
    torch.save({"name": name, "state_dict": state}, path)
    return path


def assert_same(a: Thresholds, b: Thresholds):
    for f in fields(Thresholds):
        assert getattr(a, f.name) == getattr(b, f.name), f.name


# ---- JSON ---------------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    t = Thresholds(CLIP_72OUT, [21] * 24, model="ViT-L-14-336-tome-72out", schedule="constant",
                   r_total=504, metadata={"images": 256000, "batch": 64, "note": "bf16"})
    path = t.save(tmp_path / "clip.json")
    assert path.exists()
    data = json.loads(path.read_text())
    assert data["values"] == CLIP_72OUT and data["r"] == [21] * 24
    loaded = Thresholds.load(path)
    assert_same(loaded, t)
    assert loaded.layers == 24


def test_json_round_trip_inexact_floats_and_none(tmp_path):
    values = [0.1 * i + 1 / 3 for i in range(12)]  # not bf16, not short decimals
    t = Thresholds(values, SIGLIP_B_504_LINEAR, model="", schedule="linear", r_total=None)
    loaded = Thresholds.load(t.save(tmp_path / "t.json"))
    assert_same(loaded, t)
    assert loaded.values == values and loaded.r_total is None


def test_load_non_dymu_json_raises(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"values": [0.9] * 3, "r": [1] * 3}))
    with pytest.raises(ValueError, match="format"):
        Thresholds.load(path)
    path.write_text(json.dumps({"format": "something-else/1", "values": [0.9], "r": [1]}))
    with pytest.raises(ValueError):
        Thresholds.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError):
        Thresholds.load(path)


def test_validation():
    with pytest.raises(ValueError, match="NaN"):
        Thresholds([0.9, math.nan, 0.8], [1, 1, 1])
    with pytest.raises(ValueError, match=r"3 thresholds but 2"):
        Thresholds([0.9, 0.9, 0.8], [1, 1])
    with pytest.raises(ValueError):
        Thresholds([0.9], [1, 1])


def test_nan_in_json_file_raises(tmp_path):
    path = tmp_path / "nan.json"
    good = Thresholds([0.5, 0.6], [1, 1]).to_dict()
    good["values"] = [0.5, math.nan]
    path.write_text(json.dumps(good))  # json writes NaN
    with pytest.raises(ValueError, match="NaN"):
        Thresholds.load(path)


def test_check_depth():
    t = Thresholds(CLIP_72OUT, [21] * 24, model="ViT-L-14-336-tome-72out")
    t.check_depth(24)
    with pytest.raises(ValueError) as err:
        t.check_depth(12)
    msg = str(err.value)
    assert "24" in msg and "12" in msg
    assert msg.index("24") != msg.index("12")


def test_uniform():
    t = Thresholds.uniform(0.9, 5)
    assert t.values == [0.9] * 5 and t.r == [1] * 5 and t.layers == 5


# ---- reference .pth checkpoints -----------------------------------------------------------

def test_import_clip_72out(tmp_path):
    path = write_checkpoint(tmp_path / "clip.pth", "ViT-L-14-336-tome-72out", CLIP_KEY, CLIP_72OUT)
    t = Thresholds.from_reference_checkpoint(path)
    assert t.values == CLIP_72OUT
    assert t.r == [21] * 24  # r_total = 576 - 72 = 504, constant
    assert t.schedule == "constant"
    assert t.model == "ViT-L-14-336-tome-72out"
    assert t.layers == 24


def test_published_preset_equals_the_reference_checkpoint_it_came_from(tmp_path):
    path = write_checkpoint(tmp_path / "clip.pth", "ViT-L-14-336-tome-72out", CLIP_KEY, CLIP_72OUT)
    imported, preset = Thresholds.from_reference_checkpoint(path), Thresholds.published()
    assert (preset.values, preset.r, preset.schedule, preset.model) == \
        (imported.values, imported.r, imported.schedule, imported.model)
    with pytest.raises(ValueError, match="no published thresholds named 'ViT-B-16-tome-72out'"):
        Thresholds.published("ViT-B-16-tome-72out")


def test_import_siglip_b_72out_linear(tmp_path):
    path = write_checkpoint(tmp_path / "siglip.pth", "ViT-B-16-SigLIP-384-tome-72out-linear",
                            SIGLIP_KEY, SIGLIP_B)
    t = Thresholds.from_reference_checkpoint(path)
    assert t.values == SIGLIP_B
    assert t.r == SIGLIP_B_504_LINEAR and sum(t.r) == 504
    assert t.schedule == "linear"


def test_import_so400m_81out(tmp_path):
    path = write_checkpoint(tmp_path / "ov.pth", "google/siglip-so400m-patch14-384-81out",
                            OV_KEY, SO400M)
    t = Thresholds.from_reference_checkpoint(path)
    assert t.values == SO400M
    assert t.r == [24] * 27  # (729 - 81) / 27
    assert t.schedule == "constant"


def test_import_reads_keys_in_block_order_not_file_order(tmp_path):
    state = {CLIP_KEY.format(i): bf16(CLIP_72OUT[i]) for i in reversed(range(24))}
    path = tmp_path / "rev.pth"
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": state}, path)
    assert Thresholds.from_reference_checkpoint(path).values == CLIP_72OUT


def test_import_without_module_prefix(tmp_path):
    state = {f"visual.trunk.blocks.{i}.threshold": bf16(v) for i, v in enumerate(SIGLIP_B)}
    path = tmp_path / "plain.pth"
    torch.save({"name": "ViT-B-16-SigLIP-384-tome-72out-linear", "state_dict": state}, path)
    assert Thresholds.from_reference_checkpoint(path).values == SIGLIP_B


def test_load_reads_a_reference_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path / "clip.pth", "ViT-L-14-336-tome-72out", CLIP_KEY, CLIP_72OUT)
    t = Thresholds.load(path)
    assert t.values == CLIP_72OUT and t.r == [21] * 24
    # and the import survives a JSON round trip
    assert_same(Thresholds.load(t.save(tmp_path / "clip.json")), t)


def test_import_no_threshold_keys_raises(tmp_path):
    path = tmp_path / "empty.pth"
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": unrelated_entries()}, path)
    with pytest.raises(ValueError, match="threshold"):
        Thresholds.from_reference_checkpoint(path)
    with pytest.raises(ValueError, match="threshold"):
        Thresholds.load(path)


def test_import_non_contiguous_blocks_raises(tmp_path):
    state = {CLIP_KEY.format(i): bf16(0.875) for i in (0, 1, 3)}
    path = tmp_path / "gap.pth"
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": state}, path)
    with pytest.raises(ValueError, match="contiguous"):
        Thresholds.from_reference_checkpoint(path)
    state = {CLIP_KEY.format(i): bf16(0.875) for i in (1, 2, 3)}  # does not start at 0
    torch.save({"name": "ViT-L-14-336-tome-72out", "state_dict": state}, path)
    with pytest.raises(ValueError, match="contiguous"):
        Thresholds.from_reference_checkpoint(path)
