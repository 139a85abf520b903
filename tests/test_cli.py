"""The demo command end to end on a small HF encoder (the README's default runs in .ci/run)."""

import json
import re

import pytest

from dymu_viz.cli import main

pytestmark = pytest.mark.exact_counts  # asserts exact counts / groups / thresholds: also run under baseline CPU kernels


def test_demo_writes_counts_and_maps(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--model", "openai/clip-vit-base-patch16", "--pretrained", "random",
                 "--images", "astronaut", "rocket", "coffee", "--target", "50out", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "weights : RANDOM" in printed
    summary = json.loads((out / "counts.json").read_text())
    assert summary["weights"].startswith("RANDOM")
    assert set(summary["counts"]) == {"astronaut", "rocket", "coffee"}
    for name, row in summary["counts"].items():
        assert len(row) == 13 and row[0] == 197
        assert all(a >= b for a, b in zip(row, row[1:])), "token counts never grow"
        assert re.search(rf"^{name} +197 -> +{row[-1]} ", printed, re.MULTILINE)
        assert (out / f"{name}.png").stat().st_size > 1000
    # calibrated on the bundled calibration pictures, not on the images it encodes
    assert "calibrated on the 12 bundled calibration pictures" in printed
    assert summary["thresholds"]["metadata"]["n_images"] == 12
    assert len(summary["thresholds"]["values"]) == 12


def test_demo_reports_unknown_model(capsys):
    assert main(["demo", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_explicit_pretrained_tag_without_local_weights_is_an_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HOME", str(tmp_path))
    import dymu_viz.models as models
    monkeypatch.setattr(models, "_open_clip_cached_file", lambda name, tag: None)
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        models.load_encoder("ViT-B-16", pretrained="openai")
