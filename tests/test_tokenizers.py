"""load_tokenizer: open_clip's real tokenizer whenever it is on this machine, a labelled stand-in
only for random weights, and an error for real weights without their tokenizer.

The Hugging Face cache is pointed at an empty folder (or one the test fills), so these tests
mean the same on a machine that happens to have SigLIP's tokenizer cached.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from dymu_viz.models import LoadedEncoder, StandInTokenizer, load_encoder, load_tokenizer

SIGLIP, CLIP = "ViT-B-16-SigLIP-384", "ViT-B-16"
SIGLIP_HF_TOKENIZER = "timm/ViT-B-16-SigLIP"
LABELS = ["a diagram", "a dog", "a cat"]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def encoder_record(name: str, pretrained: bool) -> LoadedEncoder:
    """What load_encoder returns, without building the model (only .name and .pretrained matter)."""
    return LoadedEncoder(nn.Identity(), lambda image: image, name, "test weights", pretrained)


def tiny_hf_tokenizer(folder: Path) -> Path:
    """A small word-level HF tokenizer saved to ``folder`` (stands for SigLIP's real files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "diagram", "dog", "cat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


# --- the stand-in ------------------------------------------------------------------------------

def test_stand_in_for_random_siglip_is_labelled_sized_and_deterministic() -> None:
    tok = load_tokenizer(SIGLIP, "random")
    assert tok.stand_in and tok.note.startswith("STAND-IN") and "random" in tok.note
    cfg = open_clip.get_model_config(SIGLIP)["text_cfg"]
    ids = tok(LABELS)
    assert ids.shape == (len(LABELS), cfg["context_length"]) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < cfg["vocab_size"]
    assert torch.equal(ids, tok(LABELS)) and torch.equal(ids, StandInTokenizer.for_model(SIGLIP)(LABELS))
    assert len({tuple(row) for row in ids.tolist()}) == len(LABELS)  # different labels, different ids
    assert torch.equal(tok("a dog"), ids[1:2])  # a single string is a batch of one, as in open_clip
    assert tok(LABELS, context_length=16).shape == (len(LABELS), 16)


def test_stand_in_layout() -> None:
    tok = StandInTokenizer(vocab_size=300, context_length=6, eot_id=299, pad_id=0, sot_id=298)
    assert tok(["ab", "  a   b "]).tolist() == [[298, 98, 99, 299, 0, 0], [298, 98, 33, 99, 299, 0]]
    long = tok("x" * 100)  # truncated, the end-of-text id kept last
    assert long.tolist() == [[298, 121, 121, 121, 121, 299]]
    small = StandInTokenizer(vocab_size=10, context_length=8, eot_id=9)("wrap around")
    assert int(small.max()) < 10 and int(small.min()) >= 0  # fewer than 256 free ids: wraps, stays in range
    with pytest.raises(ValueError, match="below vocab_size"):
        StandInTokenizer(vocab_size=10, context_length=8, eot_id=10)


def test_clip_layout_stand_in_pools_at_the_end_of_text() -> None:
    """CLIP's text tower pools at the argmax id: the stand-in puts its eot (the largest id) there,
    with the same sot/eot ids and output shape and dtype as the real tokenizer."""
    real, stand_in = open_clip.get_tokenizer(CLIP), StandInTokenizer.for_model(CLIP)
    ids, real_ids = stand_in(LABELS), real(LABELS)
    assert ids.shape == real_ids.shape and ids.dtype == real_ids.dtype
    assert torch.equal(ids[:, 0], real_ids[:, 0])  # sot
    assert ids.argmax(dim=-1).tolist() == [len(label.encode()) + 1 for label in LABELS]
    assert int(ids.max()) == int(real_ids.max())  # eot


# --- real tokenizers ---------------------------------------------------------------------------

@pytest.mark.parametrize("pretrained", ["random", "auto"])
def test_clip_gets_the_real_bundled_tokenizer(pretrained: str) -> None:
    for tok in (load_tokenizer(CLIP, pretrained), load_tokenizer(encoder_record(CLIP, pretrained=True))):
        assert not tok.stand_in and "bundled" in tok.note
        assert torch.equal(tok(LABELS), open_clip.get_tokenizer(CLIP)(LABELS))


def test_hf_tokenizer_from_a_folder(tmp_path: Path) -> None:
    folder = tiny_hf_tokenizer(tmp_path / "siglip_tokenizer")
    tok = load_tokenizer(encoder_record(SIGLIP, pretrained=True), tokenizer=folder)
    assert not tok.stand_in and "siglip_tokenizer" in tok.note
    ids = tok(LABELS)
    assert ids.shape == (len(LABELS), 64) and ids.dtype == torch.long
    assert ids[:, :3].tolist() == [[3, 4, 0], [3, 5, 0], [3, 6, 0]]  # its word ids, then padding


def test_hf_tokenizer_from_the_local_cache(tmp_path: Path, hf_cache: Path) -> None:
    repo, commit = hf_cache / f"models--{SIGLIP_HF_TOKENIZER.replace('/', '--')}", "0" * 40
    tiny_hf_tokenizer(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # AutoTokenizer also asks for a model config.json; the cache records files a repo lacks here
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "config.json").touch()
    for tok in (load_tokenizer(encoder_record(SIGLIP, pretrained=True)), load_tokenizer(SIGLIP, "random")):
        assert not tok.stand_in and "local Hugging Face cache" in tok.note and SIGLIP_HF_TOKENIZER in tok.note
        assert tok(LABELS)[:, :3].tolist() == [[3, 4, 0], [3, 5, 0], [3, 6, 0]]


# --- errors --------------------------------------------------------------------------------------

def test_real_weights_without_their_tokenizer_are_an_error(tmp_path: Path) -> None:
    weights = tmp_path / "siglip_weights.safetensors"
    weights.write_bytes(b"")
    for args in ((encoder_record(SIGLIP, pretrained=True),), (SIGLIP, str(weights))):
        with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*only used with random"):
            load_tokenizer(*args)
    with pytest.raises(FileNotFoundError, match="no usable tokenizer files"):  # a folder asked for must be there
        load_tokenizer(SIGLIP, "random", tokenizer=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no usable tokenizer files"):
        load_tokenizer(SIGLIP, "random", tokenizer=tmp_path / "empty")


def test_vision_only_models_have_no_tokenizer() -> None:
    with pytest.raises(ValueError, match="no text tower"):
        load_tokenizer("google/siglip-base-patch16-384", "random")


# --- the text tower runs on the stand-in ids -----------------------------------------------------

def test_siglip_encode_text_runs_with_stand_in_ids() -> None:
    torch.manual_seed(0)
    loaded = load_encoder(SIGLIP, "random")
    tok = load_tokenizer(loaded)
    assert tok.stand_in
    with torch.no_grad():
        text = loaded.model.encode_text(tok(LABELS))
        image = loaded.model.encode_image(torch.zeros(1, 3, 384, 384))
    assert text.shape == (len(LABELS), image.shape[-1]) and torch.isfinite(text).all()
    assert not torch.allclose(text[0], text[1])  # the labels' embeddings differ
