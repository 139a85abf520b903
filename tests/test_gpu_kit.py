"""The GPU kit (``benchmarks/gpu.py``) in its CPU smoke mode, through the entry point a GPU run
uses: every section runs, the JSON and markdown carry every field a GPU run fills (not speeds),
the SDPA route report names the kernels, and a call on the math kernel fails the run. The
kit runs in a child process where ``import open_clip`` fails, as on the GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu.py"
# the kit as a GPU run starts it, with open_clip made unimportable; PREFIX runs code around it
LAUNCH = """
import runpy, sys
sys.modules["open_clip"] = None
sys.argv = [{kit!r}, *sys.argv[1:]]
{prefix}runpy.run_path({kit!r}, run_name="__main__")
"""
FORCED_MATH = "from torch.nn.attention import SDPBackend, sdpa_kernel\nwith sdpa_kernel([SDPBackend.MATH]):\n    "


def run_kit(out: Path, *args: str, prefix: str = "") -> tuple[int, dict[str, Any], str]:
    """Run the kit with ``--out out`` and ``args``: its exit status, JSON and markdown."""
    code = LAUNCH.format(kit=str(KIT), prefix=prefix)
    proc = subprocess.run([sys.executable, "-c", code, "--out", str(out), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert (out / "gpu.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode, json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any], str]:
    return run_kit(tmp_path_factory.mktemp("gpu_kit"), "--smoke")


def test_smoke_run_passes_without_open_clip(smoke):
    rc, data, _ = smoke
    assert rc == 0, data["failures"]
    assert data["status"] == "ok" and data["failures"] == []
    assert data["smoke"] is True and data["finished"] is not None
    assert data["open_clip_imported"] is False
    assert {name: s["status"] for name, s in data["sections"].items()} == dict.fromkeys(
        ("encoder", "llava", "onevision", "qwen"), "done")
    assert all(s["error"] is None and s["seconds"] > 0 for s in data["sections"].values())


def test_machine_versions_and_settings(smoke):
    _, data, _ = smoke
    assert data["machine"]["device_type"] == "cpu" and data["machine"]["device"] == "cpu"
    versions = data["versions"]
    assert {"python", "torch", "transformers", "dymu_viz", "commit"} <= set(versions)
    assert set(versions["transformers_check"]) == {"tested", "override", "refusal"}
    settings = data["settings"]
    assert settings["dtype"] == "bfloat16" and settings["device"] == "cpu"
    assert settings["reps"] >= 1 and settings["decode_steps"] >= 1 and "plan" in settings


def test_encoder_rows(smoke):
    _, data, _ = smoke
    rows = data["sections"]["encoder"]["rows"]["encoder"]
    plan = data["settings"]["plan"]
    batches = [(r["model"], r["batch"]) for r in rows]
    assert batches == [("ViT-L-14-336", b) for b in plan["encoder_batches"]] + \
        [("SigLIP-SO400M-384", plan["encoder_batches"][1])]
    for r in rows:
        assert set(r["seconds"]) == set(r["images_per_s"]) == {"unpatched", "off", "dtome"}
        assert r["flop_bound"] >= 1.0 and r["dtome_over_bound"] == pytest.approx(r["dtome_speedup"] / r["flop_bound"])
        assert r["off_over_unpatched_time"] > 0 and 0 < r["mean_output_tokens"] and r["padding_flop_share"] >= 0
    assert rows[0]["thresholds"] == "published 72out" and rows[0]["padding_flop_share"] == 0


def test_llava_rows(smoke):
    _, data, _ = smoke
    rows = data["sections"]["llava"]["rows"]
    prefill = rows["llm_prefill"]
    assert [r["image_tokens"] for r in prefill] == [576, 394, 195, 89]
    for r in prefill:  # KV bytes are exact, not timings: they equal their formulas
        assert set(r["seconds"]) == {"full", "vtu", "vtu_fast", "compact", "flop_equivalent"}
        assert r["kv_ratio_vtu"] == pytest.approx(r["expected_kv_ratio"])
        assert r["kv_ratio_vtu_fast"] == pytest.approx(r["expected_kv_ratio_fast"])
        assert set(r["peak_growth_bytes"]) >= {"full", "vtu", "compact"}  # None on a CPU
    decode = rows["llm_decode"]
    batches = data["settings"]["plan"]["decode_batches"]
    assert [(r["batch"], r["image_tokens"]) for r in decode] == [(b, n) for b in batches for n in (576, 394, 195, 89)]
    for r in decode:
        assert set(r["step_ratio"]) == set(r["end_to_end_ratio"]) == {"vtu", "vtu_fast", "compact"}
        assert set(r["step_seconds"]) == set(r["end_to_end_seconds"]) == {"full", "vtu", "vtu_fast", "compact"}


def test_whole_model_rows(smoke):
    _, data, _ = smoke
    for section in ("llava", "onevision", "qwen"):
        rows = data["sections"][section]["rows"]["vlm"]
        tower = ["dymu in tower vtu"] if section == "qwen" else []
        assert [r["setting"] for r in rows] == ["full", "dymu vtu", "dymu compact", *tower]
        full = rows[0]
        assert full["total_over_full"] == 1.0
        for r in rows:
            assert {"vision_s", "prefill_s", "decode_s_per_token", "total_s", "prefill_flops", "peak_mib"} <= set(r)
            assert r["image_tokens"] <= full["image_tokens"]
        assert rows[1]["llm_virtual_length"] == full["llm_virtual_length"]  # VTU attends over the full length
    qwen = data["sections"]["qwen"]["rows"]["vlm"]
    assert qwen[3]["vision_flops"] < qwen[0]["vision_flops"]  # merging inside the tower saves its FLOPs
    assert qwen[3]["llm_virtual_length"] == qwen[0]["llm_virtual_length"]


def test_route_report(smoke):
    _, data, md = smoke
    routes = data["routes"]
    assert data["routes_fused"] is True
    for r in routes:
        assert set(r) == {"section", "kind", "sdpa_calls", "kernels", "vtu_routes", "fused"}
        assert set(r["kernels"]) == {"flash", "memory_efficient", "cudnn", "other", "math"}
        assert r["kernels"]["math"] == 0 and r["fused"] is True
        assert sum(r["kernels"].values()) == r["sdpa_calls"]
    assert {r["section"] for r in routes if r["sdpa_calls"]} == {"encoder", "llava", "onevision", "qwen"}
    vtu_routes = {name for r in routes for name in r["vtu_routes"]}
    assert vtu_routes == {"causal", "no_mask", "mask", "slot_probabilities"}
    assert "## SDPA routes" in md and "| fused |" in md and "MATH" not in md


def test_markdown_has_every_table(smoke):
    _, _, md = smoke
    for heading in ("## encoder: done", "## llava: done", "## onevision: done", "## qwen: done", "Encoders:",
                    "prefill, batch 1:", "decode (", "Whole model (tower included)"):
        assert heading in md


def test_math_kernel_fails_the_run(tmp_path):
    rc, data, md = run_kit(tmp_path, "--smoke", "--only", "encoder", "--commit", "abc1234", prefix=FORCED_MATH)
    assert rc == 1 and data["status"] == "failed" and data["routes_fused"] is False
    assert data["versions"]["commit"] == "abc1234" and "at abc1234" in md  # a copied tree's commit, as given
    assert data["sections"]["encoder"]["status"] == "done"
    routes = data["routes"]
    assert routes and all(r["kernels"]["math"] == r["sdpa_calls"] > 0 and not r["fused"] for r in routes)
    assert any(f.startswith("SDPA on the math kernel") for f in data["failures"])
    assert "**MATH: FAILED**" in md
