"""QuickGELU wherever the weights are OpenAI's (OpenAI CLIP was trained with x * sigmoid(1.702 x);
open_clip's plain configs say GELU, so a tower built from them runs real OpenAI weights wrongly,
with no error). The activation must follow the weights through ``load_encoder``, the CLI and
checkpoint files, and an open_clip tower must equal an HF ``CLIPVisionModel`` holding the same
weights (HF's CLIP configs say ``quick_gelu``)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

import dymu_viz
from dymu_viz.cli import build_parser
from dymu_viz.data import sample_photos
from dymu_viz.models import hf_clip_from_open_clip, load_encoder, trained_with_quick_gelu


def activations(model: nn.Module) -> set[type]:
    """The activation module types of every open_clip residual block's MLP."""
    return {type(blk.mlp.gelu) for blk in model.visual.transformer.resblocks}


@pytest.mark.parametrize("name", ["ViT-B-16", pytest.param("ViT-L-14-336", marks=pytest.mark.slow)])
def test_random_openai_architectures_use_quick_gelu(name: str) -> None:
    loaded = load_encoder(name, "random")
    assert activations(loaded.model) == {QuickGELU}
    assert "QuickGELU" in loaded.weights
    assert trained_with_quick_gelu(name)


def test_siglip_keeps_its_gelu() -> None:
    assert not trained_with_quick_gelu("ViT-B-16-SigLIP-384")
    loaded = load_encoder("ViT-B-16-SigLIP-384", "random")
    assert "GELU activation" in loaded.weights and "QuickGELU" not in loaded.weights
    assert not any(isinstance(m, QuickGELU) for m in loaded.model.modules())


@pytest.fixture(scope="module")
def b16_checkpoint(tmp_path_factory) -> tuple[str, dict]:
    """A ViT-B-16 state-dict file (as users keep OpenAI weights) and its tensors."""
    torch.manual_seed(3)
    state = open_clip.create_model("ViT-B-16", pretrained=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "vit-b-16-openai.pt"
    torch.save(state, path)
    return str(path), state


@torch.no_grad()
def test_checkpoint_file_defaults_to_quick_gelu_and_can_be_told_otherwise(b16_checkpoint) -> None:
    path, state = b16_checkpoint
    quick = load_encoder("ViT-B-16", path)
    assert quick.pretrained and activations(quick.model) == {QuickGELU} and "QuickGELU" in quick.weights
    for key, value in quick.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    plain = load_encoder("ViT-B-16", path, quick_gelu=False)
    assert activations(plain.model) == {nn.GELU} and "; GELU activation" in plain.weights
    x = quick.preprocess(sample_photos(["astronaut"])["astronaut"])[None]
    gap = (quick.model.encode_image(x) - plain.model.encode_image(x)).abs().max()
    assert gap > 1e-3, "the activation must matter, or this test shows nothing"


def test_cli_passes_the_activation_choice() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).quick_gelu is None
    assert parser.parse_args(["demo", "--no-quick-gelu"]).quick_gelu is False
    args = parser.parse_args(["calibrate", "--model", "ViT-B-16", "--pretrained", "w.pt", "--quick-gelu",
                              "--folder", ".", "--target", "72out", "--out", "t.json"])
    assert args.quick_gelu is True


def test_quick_gelu_is_refused_for_hf_models() -> None:
    with pytest.raises(ValueError, match="open_clip models only"):
        load_encoder("openai/clip-vit-base-patch16", "random", quick_gelu=True)


@torch.no_grad()
def test_open_clip_tower_equals_hf_clip_vision_model_with_the_same_weights(b16_checkpoint) -> None:
    """open_clip -> HF key mapping; same features in fp32 (1e-4), merged or not, and the same
    DToMe token counts on real photos."""
    loaded = load_encoder("ViT-B-16", b16_checkpoint[0])
    visual = loaded.model.visual
    hf = hf_clip_from_open_clip(visual)
    assert hf.config.hidden_act == "quick_gelu"
    photos = sample_photos(["astronaut", "rocket", "coffee"])
    x = torch.stack([loaded.preprocess(im) for im in photos.values()])
    assert torch.allclose(hf(x).pooler_output @ visual.proj, visual(x), atol=1e-4, rtol=0)

    thresholds = [0.95, 0.9, 0.9, 0.88, 0.88, 0.86, 0.86, 0.86, 0.86, 0.86, 0.86, 0.86]
    dymu_viz.patch(visual, thresholds)
    dymu_viz.patch(hf, thresholds)
    ours, theirs = dymu_viz.encode(visual, x), dymu_viz.encode(hf, x)
    assert (ours.n_tokens < 197).all(), "the thresholds must merge, or this compares nothing"
    assert torch.equal(ours.counts, theirs.counts)
    assert torch.allclose(theirs.pooled @ visual.proj, ours.pooled, atol=1e-4, rtol=0)
