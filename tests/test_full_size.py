"""The exact full-size architectures users run (random init): ViT-L-14-336 and SigLIP towers.

Tiny models cover the logic; these check that nothing depends on toy shapes (577 / 576 / 729
tokens, 24-27 layers, QuickGELU, the MAP head of a real SigLIP trunk)."""

import open_clip
import pytest
import torch

import dymu_viz
from dymu_viz.models import load_encoder

pytestmark = [pytest.mark.slow, pytest.mark.exact_counts]  # exact_counts: also run under baseline CPU kernels


@pytest.fixture(scope="module")
def clip_l():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True).eval()


@torch.no_grad()
def test_vit_l_14_336_merging_off_equals_unpatched_and_thresholds_merge(clip_l):
    x = torch.randn(1, 3, 336, 336)
    ref = clip_l.encode_image(x)
    dymu_viz.patch(clip_l)
    assert torch.allclose(clip_l.encode_image(x), ref, atol=1e-5, rtol=0)
    dymu_viz.patch(clip_l, r=21)  # the 72out schedule as ToMe: 577 - 24 * 21 = 73 tokens
    clip_l.encode_image(x)
    assert clip_l.dymu.last.counts[0].tolist() == [577 - 21 * i for i in range(25)]
    dymu_viz.unpatch(clip_l)
    assert torch.equal(clip_l.encode_image(x), ref)


@torch.no_grad()
def test_vit_b_16_siglip_384_batch_of_mixed_images_matches_each_alone():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP-384", pretrained=None).eval()
    x = torch.randn(3, 3, 384, 384)
    x[1] = x[1, :, :1, :1]  # a flat image: merges far more than noise
    x[2, :, :192] = 0.3
    dymu_viz.patch(model, thresholds=0.6)
    batched = model.encode_image(x)
    counts = model.dymu.last.counts
    assert len(set(counts[:, -1].tolist())) == 3, "the three images should end with different counts"
    for b in range(3):
        alone = model.encode_image(x[b:b + 1])
        assert torch.equal(model.dymu.last.counts[0], counts[b])
        assert torch.allclose(alone[0], batched[b], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_hf_siglip_so400m_as_llava_onevision_uses_it():
    """SO400M with the last layer dropped (26 layers), as LLaVA-OneVision feeds it."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    model = SiglipVisionModel(config).eval()
    x = torch.randn(1, 3, 384, 384)
    ref = model(x, output_hidden_states=True)
    dymu_viz.patch(model, thresholds=float("inf"))
    out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == 27
    assert torch.allclose(out.hidden_states[-1], ref.hidden_states[-1], atol=1e-5, rtol=0)
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
    dymu_viz.patch(model, thresholds=-float("inf"))
    model(x)
    expected = dymu_viz.token_counts(729, [10 ** 6] * 26, protected=0)
    assert model.dymu.last.counts[0].tolist() == expected


def test_load_encoder_builds_the_exact_hf_clip_l_336_architecture():
    loaded = load_encoder("openai/clip-vit-large-patch14-336", pretrained="random")
    assert not loaded.pretrained and loaded.weights.startswith("RANDOM")
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.patch_size) == (1024, 24, 336, 14)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(303.5e6, rel=0.01)
    from dymu_viz.data import sample_photos
    pixels = loaded.preprocess(sample_photos(["chelsea"])["chelsea"])
    assert pixels.shape == (3, 336, 336)
