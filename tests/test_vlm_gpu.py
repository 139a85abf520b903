"""The VLM and calibration paths on a CUDA GPU in bf16, where one is present (never in CI here:
the CPU machines have none). They check that every tensor the pipeline makes lands on the
model's device and that bf16 runs agree with the model's own bf16 numbers.

    python -m pytest tests/test_vlm_gpu.py          # on a machine with a GPU
"""

from __future__ import annotations

import pytest
import torch

import dymu_viz
from dymu_viz import vlm
from test_vlm_hf_native import batch
from tiny_models import make_hf_siglip, redundancy_images, tiny_vlm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("family", ["llava", "onevision"])
@pytest.mark.parametrize("mode", ["vtu", "compact", "full"])
def test_bf16_on_cuda_matches_the_unpatched_model_without_merging(family: str, mode: str) -> None:
    model, processor = tiny_vlm(family, torch.bfloat16)
    model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch(processor, model).items()}
    reference = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    vlm.patch_vlm(model, thresholds=float("inf"), mode=mode)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert out.sequences.device.type == "cuda"
    for a, b in zip(out.logits, reference.logits):
        assert float((a.float() - b.float()).abs().max()) < 0.05
    vlm.patch_vlm(model, thresholds=0.3, mode=mode)
    merged = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=2)
    assert merged.device.type == "cuda"


def test_calibration_on_cuda_in_bf16() -> None:
    model = make_hf_siglip(image=112, patch=14).cuda().to(torch.bfloat16)
    x = redundancy_images(112, 14).cuda().to(torch.bfloat16)
    found = dymu_viz.find_thresholds(model, [x, x.flip(0)], target="8out")
    assert all(v == v for v in found.values) and found.layers == 4
    dymu_viz.patch(model, found)
    assert dymu_viz.encode(model, x).counts.device.type == "cuda"
