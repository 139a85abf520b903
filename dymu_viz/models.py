"""Build the encoders users know by name, with real weights when they are on this machine.

``load_encoder(name, pretrained=...)``:

* ``pretrained="random"``: the exact architecture, randomly initialised (says so);
* an open_clip tag (``"openai"``, ``"webli"``) or an HF id: the weights from the local cache,
  or a clear error (pass ``allow_download=True`` to fetch them);
* a file or folder path: those weights;
* ``"auto"``: the default pretrained weights if they are cached locally, else random init, and
  the returned ``LoadedEncoder.weights`` says which, in words, for the caller to print.

OpenAI's CLIP checkpoints were trained with QuickGELU (x * sigmoid(1.702 x)), and open_clip's
plain model configs (``ViT-L-14-336``, ``ViT-B-16``, ...) say GELU: built as they are, real OpenAI
weights give silently wrong features. So the activation follows the weights: a pretrained tag
brings its own (open_clip records it per tag), and random initialisation or a checkpoint file
takes the default tag's (QuickGELU for the names whose default is ``openai``) unless
``quick_gelu=`` says otherwise. The weights note names the activation.

``load_tokenizer(name or loaded encoder, ...)``: the text tokenizer for ``encode_text`` (open_clip
models): the real one when it is on this machine, else, for random weights only, a
``StandInTokenizer`` whose note says so; real weights without their tokenizer are an error.

Nothing is ever downloaded unless asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from itertools import islice
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

# open_clip model name -> default pretrained tag.
# dtype names accepted by the CLI and the lmms-eval models (float64: the same counts on every CPU)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

OPEN_CLIP_MODELS = {
    "ViT-L-14-336": "openai",
    "ViT-L-14": "openai",
    "ViT-B-16": "openai",
    "ViT-B-32": "openai",
    "ViT-B-16-SigLIP-384": "webli",
    "ViT-B-16-SigLIP": "webli",
    "ViT-SO400M-14-SigLIP-384": "webli",
}

# HF ids -> (family, vision config of the exact architecture, image processor settings).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HF_MODELS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "openai/clip-vit-large-patch14-336": ("clip", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        dict(size=336, crop=True, mean=_CLIP_MEAN, std=_CLIP_STD)),
    "openai/clip-vit-base-patch16": ("clip", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=16, projection_dim=512, hidden_act="quick_gelu"),
        dict(size=224, crop=True, mean=_CLIP_MEAN, std=_CLIP_STD)),
    "google/siglip-so400m-patch14-384": ("siglip", dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh"),
        dict(size=384, crop=False, mean=(0.5,) * 3, std=(0.5,) * 3)),
    "google/siglip-base-patch16-384": ("siglip", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=384, patch_size=16, hidden_act="gelu_pytorch_tanh"),
        dict(size=384, crop=False, mean=(0.5,) * 3, std=(0.5,) * 3)),
}


@dataclass
class LoadedEncoder:
    """A model ready for ``dymu_viz.patch``, its eval transform (PIL -> (3, H, W) tensor) and
    a plain-words statement of where its weights came from."""

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    name: str
    weights: str
    pretrained: bool


def known_models() -> list[str]:
    return list(OPEN_CLIP_MODELS) + list(HF_MODELS)


def load_encoder(name: str, pretrained: str = "auto", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, allow_download: bool = False,
                 quick_gelu: Optional[bool] = None) -> LoadedEncoder:
    """Build encoder ``name`` (an open_clip name, an HF id, or a local HF folder).

    quick_gelu (open_clip names only): the MLP activation; None = the one the weights were
    trained with (see the module docstring). HF models take it from their config."""
    if name in OPEN_CLIP_MODELS:
        loaded = _load_open_clip(name, pretrained, allow_download, quick_gelu)
    elif quick_gelu is not None:
        raise ValueError(f"quick_gelu applies to open_clip models only; {name} takes its activation from its config")
    elif name in HF_MODELS or Path(name).is_dir():
        loaded = _load_hf(name, pretrained, allow_download)
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(known_models())}, or a local HF model folder")
    loaded.model = loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def _random_note(name: str, reason: str) -> str:
    return f"RANDOM (random initialisation of the exact {name} architecture: {reason})"


def _open_clip_cached_file(name: str, tag: str) -> Optional[str]:
    """Path of cached open_clip weights for (name, tag), looking only at local caches."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {name}; "
                         f"available: {open_clip.list_pretrained_tags_by_model(name)}")
    repo = cfg.get("hf_hub", "").rstrip("/")
    if repo:
        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, filename)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url:
        legacy = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if legacy.is_file():
            return str(legacy)
    return None


def _open_clip_source(name: str, pretrained: str, allow_download: bool) -> tuple[Optional[str], str, str]:
    """(what to hand open_clip as ``pretrained``: None for random init; the weights note; the
    pretrained tag whose training activation the model must use)."""
    default_tag = OPEN_CLIP_MODELS[name]
    if pretrained == "random":
        return None, _random_note(name, "asked for"), default_tag
    if Path(pretrained).is_file():
        return pretrained, f"pretrained, from the file {Path(pretrained).name}", default_tag
    tag = default_tag if pretrained == "auto" else pretrained
    cached = _open_clip_cached_file(name, tag)
    if cached is not None:
        return cached, f"pretrained ({tag}), from the local cache", tag
    if allow_download:
        return tag, f"pretrained ({tag}), downloaded", tag
    if pretrained == "auto":
        return None, _random_note(name, f"no local copy of the {tag!r} weights"), tag
    raise FileNotFoundError(
        f"the {tag!r} weights of {name} are not in the local cache; download them explicitly "
        "(allow_download=True / --download), or pass a checkpoint path, or use pretrained='random'")


def trained_with_quick_gelu(name: str, tag: Optional[str] = None) -> bool:
    """Whether open_clip's pretrained tag (default: the name's default tag) was trained with
    QuickGELU: True for OpenAI's CLIP weights."""
    import open_clip

    return bool(open_clip.get_pretrained_cfg(name, tag or OPEN_CLIP_MODELS[name]).get("quick_gelu", False))


def _load_open_clip(name: str, pretrained: str, allow_download: bool, quick_gelu: Optional[bool]) -> LoadedEncoder:
    import open_clip

    source, weights, tag = _open_clip_source(name, pretrained, allow_download)
    if quick_gelu is None:
        quick_gelu = trained_with_quick_gelu(name, tag)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source, force_quick_gelu=quick_gelu)
    weights += "; QuickGELU activation" if quick_gelu else "; GELU activation"
    return LoadedEncoder(model, preprocess, name, weights, source is not None)


def _load_hf(name: str, pretrained: str, allow_download: bool) -> LoadedEncoder:
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    if pretrained != "random":
        source = pretrained if Path(pretrained).is_dir() else name
        try:
            return _hf_from_pretrained(source, local_files_only=not allow_download)
        except OSError as err:
            if pretrained != "auto" or name not in HF_MODELS:
                raise FileNotFoundError(
                    f"no local copy of {source} ({err.__class__.__name__}); download it explicitly "
                    "(allow_download=True / --download), pass a local folder, or use pretrained='random'") from None
    if name not in HF_MODELS:
        raise ValueError(f"random initialisation needs a known architecture; known HF ids: {', '.join(HF_MODELS)}")
    family, config_kwargs, proc = HF_MODELS[name]
    model_cls, config_cls = (CLIPVisionModel, CLIPVisionConfig) if family == "clip" else (SiglipVisionModel, SiglipVisionConfig)
    model = model_cls(config_cls(**config_kwargs))
    reason = "asked for" if pretrained == "random" else "no local copy of the weights"
    return LoadedEncoder(model, image_transform(**proc), name, _random_note(name, reason), False)


def _hf_from_pretrained(source: str, local_files_only: bool) -> LoadedEncoder:
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    kind = getattr(config, "model_type", "")
    model_cls = CLIPVisionModel if kind.startswith("clip") else SiglipVisionModel
    model = model_cls.from_pretrained(source, local_files_only=local_files_only)
    processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
    return LoadedEncoder(model, HFImageTransform(processor), source, f"pretrained, from {source}", True)


@dataclass
class HFImageTransform:
    """An HF image processor called like a torchvision transform: one PIL image -> (3, H, W).
    Keeps the processor, so displays can undo its normalisation (``viz.normalisation_of``)."""

    processor: Any

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def image_transform(size: int, crop: bool, mean: tuple, std: tuple) -> Callable[[Any], torch.Tensor]:
    """Eval transform: CLIP style (resize shortest side + center crop) or SigLIP style (squash)."""
    from torchvision import transforms as T

    resize = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)] if crop else \
        [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose([*resize, lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(mean, std)])


def hf_clip_from_open_clip(visual: nn.Module) -> nn.Module:
    """An HF ``CLIPVisionModel`` holding the weights of an open_clip OpenAI-CLIP ViT tower
    (``model.visual``), e.g. to run open_clip weights in LLaVA's HF tower. Same activation
    (QuickGELU or GELU, read from the tower), same features: ``pooler_output @ visual.proj``
    equals ``visual(pixels)``. The packed attention in-projection is split into q / k / v."""
    from open_clip.transformer import QuickGELU
    from transformers import CLIPVisionConfig, CLIPVisionModel

    blocks = visual.transformer.resblocks
    width, heads = visual.conv1.out_channels, blocks[0].attn.num_heads
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=heads, image_size=visual.image_size[0], patch_size=visual.patch_size[0],
        hidden_act="quick_gelu" if isinstance(blocks[0].mlp.gelu, QuickGELU) else "gelu",
        layer_norm_eps=visual.ln_pre.eps, projection_dim=visual.output_dim)
    state = {"embeddings.patch_embedding.weight": visual.conv1.weight,
             "embeddings.class_embedding": visual.class_embedding,
             "embeddings.position_embedding.weight": visual.positional_embedding}
    for hf, oc in (("pre_layrnorm", visual.ln_pre), ("post_layernorm", visual.ln_post)):
        state.update({f"{hf}.weight": oc.weight, f"{hf}.bias": oc.bias})
    for i, blk in enumerate(blocks):
        pre = f"encoder.layers.{i}."
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), blk.attn.in_proj_weight.chunk(3),
                              blk.attn.in_proj_bias.chunk(3)):
            state.update({f"{pre}self_attn.{name}.weight": w, f"{pre}self_attn.{name}.bias": b})
        for hf, oc in (("self_attn.out_proj", blk.attn.out_proj), ("layer_norm1", blk.ln_1),
                       ("layer_norm2", blk.ln_2), ("mlp.fc1", blk.mlp.c_fc), ("mlp.fc2", blk.mlp.c_proj)):
            state.update({f"{pre}{hf}.weight": oc.weight, f"{pre}{hf}.bias": oc.bias})
    model = CLIPVisionModel(config).to(visual.conv1.weight.dtype)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Tokenizers for the text towers of the open_clip models (zero-shot labels).


@dataclass
class LoadedTokenizer:
    """Texts -> ``(N, context_length)`` int64 ids for ``model.encode_text``, called like an
    open_clip tokenizer, with a plain-words note of which tokenizer it is, for the caller to print."""

    tokenizer: Callable[..., torch.Tensor]
    name: str
    note: str
    stand_in: bool

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        return self.tokenizer(texts, context_length=context_length)


class StandInTokenizer:
    """NOT a real tokenizer: deterministic byte-level ids, for randomly initialised models only.

    Each UTF-8 byte of the whitespace-normalised text becomes one id (a fixed byte -> id table
    that avoids the special ids; it wraps around when the vocabulary has fewer than 256 other
    ids), laid out as open_clip's tokenizers lay out theirs: ``[sot] bytes... eot pad...`` in an
    int64 tensor of shape ``(N, context_length)``, truncated to fit with ``eot`` kept. Every id is
    below ``vocab_size``. With random weights any consistent tokenizer runs the text tower exactly
    as the real one would; with real weights its embeddings would be meaningless, so
    ``load_tokenizer`` never hands it out for real weights.
    """

    def __init__(self, vocab_size: int, context_length: int, eot_id: int, pad_id: int = 0,
                 sot_id: Optional[int] = None):
        specials = {pad_id, eot_id} | ({sot_id} if sot_id is not None else set())
        if not all(0 <= i < vocab_size for i in specials):
            raise ValueError(f"special ids {sorted(specials)} must lie below vocab_size {vocab_size}")
        self.byte_ids = list(islice((i for i in range(vocab_size) if i not in specials), 256))
        if not self.byte_ids:
            raise ValueError(f"vocab_size {vocab_size} leaves no id for text")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.eot_id, self.pad_id, self.sot_id = eot_id, pad_id, sot_id

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        head = [] if self.sot_id is None else [self.sot_id]
        if length < len(head) + 1:
            raise ValueError(f"context_length {length} leaves no room for the end-of-text id")
        ids = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [self.byte_ids[b % len(self.byte_ids)] for b in " ".join(text.split()).encode("utf-8")]
            tokens = head + body[: length - len(head) - 1] + [self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids

    @classmethod
    def for_model(cls, name: str) -> "StandInTokenizer":
        """Sized and laid out for open_clip model ``name``'s text tower: its vocabulary, context
        length and pad id; with ``argmax`` pooling (CLIP) sot/eot are the two largest ids, as in
        CLIP's BPE, so the pooled position is the end of the text; with ``eos`` pooling eot is
        the tower's eos id."""
        cfg = _text_cfg(name)
        sot = eot = None
        if cfg.pool_type == "argmax":
            sot, eot = cfg.vocab_size - 2, cfg.vocab_size - 1
        elif cfg.pool_type == "eos":
            eot = cfg.eos_id
        else:
            eot = cfg.vocab_size - 1
        return cls(cfg.vocab_size, cfg.context_length, eot, cfg.pad_id, sot)


def _text_cfg(name: str) -> Any:
    import open_clip
    from open_clip.model import CLIPTextCfg

    return CLIPTextCfg(**open_clip.get_model_config(name)["text_cfg"])


def _real_tokenizer(name: str, folder: Optional[Union[str, Path]], allow_download: bool) -> tuple[Callable, str]:
    """open_clip's tokenizer for ``name`` and a note; OSError when it is not on this machine."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    cfg = _text_cfg(name)
    if folder is None and not cfg.hf_tokenizer_name:
        return open_clip.get_tokenizer(name), "the real tokenizer (the CLIP BPE bundled with open_clip)"
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(f"no tokenizer folder {folder}")
    source = str(folder) if folder is not None else cfg.hf_tokenizer_name
    tokenizer = HFTokenizer(source, context_length=cfg.context_length, tokenizer_mode=cfg.tokenizer_mode,
                            local_files_only=folder is not None or not allow_download, **(cfg.tokenizer_kwargs or {}))
    where = f"the folder {Path(folder).name}" if folder is not None else \
        "the Hugging Face hub or its local cache" if allow_download else "the local Hugging Face cache"
    return tokenizer, f"the real tokenizer ({cfg.hf_tokenizer_name or 'HF'}), from {where}"


def load_tokenizer(model: Union[str, LoadedEncoder], pretrained: str = "auto", allow_download: bool = False,
                   tokenizer: Optional[Union[str, Path]] = None) -> LoadedTokenizer:
    """The text tokenizer of an open_clip model: ``model`` is its name, or what ``load_encoder``
    returned (then its ``pretrained`` flag decides, and ``pretrained`` here is not used).

    * open_clip's real tokenizer whenever it is on this machine: the CLIP BPE that open_clip
      bundles, an HF tokenizer (SigLIP's) from the local cache, or the tokenizer files in the
      folder ``tokenizer``; it is downloaded only with ``allow_download=True``;
    * otherwise, and only when the weights are random (``pretrained`` resolved as in
      ``load_encoder``), a ``StandInTokenizer``, and the note says STAND-IN;
    * real weights whose tokenizer is not here: ``FileNotFoundError``.

    The returned ``LoadedTokenizer.note`` says which tokenizer it is, for the caller to print.
    """
    name = model.name if isinstance(model, LoadedEncoder) else model
    if name not in OPEN_CLIP_MODELS:
        raise ValueError(f"{name} has no text tower here (HF models load as vision towers only); "
                         f"tokenizers are for the open_clip models: {', '.join(OPEN_CLIP_MODELS)}")
    try:
        real, note = _real_tokenizer(name, tokenizer, allow_download)
        return LoadedTokenizer(real, name, note, stand_in=False)
    except (OSError, ValueError) as err:
        if tokenizer is not None:  # a folder asked for is never replaced by a stand-in
            raise FileNotFoundError(f"no usable tokenizer files in {tokenizer} ({type(err).__name__}: {err})") from None
        if not isinstance(err, OSError):
            raise
        failure = type(err).__name__
    if isinstance(model, LoadedEncoder):
        random_weights = not model.pretrained
    else:  # the weights load_encoder(name, pretrained, allow_download=...) would load
        random_weights = _open_clip_source(name, pretrained, allow_download)[0] is None
    wanted = _text_cfg(name).hf_tokenizer_name
    where = "could not be downloaded" if allow_download else "is not in the local Hugging Face cache"
    if not random_weights:
        raise FileNotFoundError(
            f"the tokenizer of {name} ({wanted}) {where} ({failure}); download it explicitly "
            "(allow_download=True), or pass tokenizer=<a local folder with its files>. A stand-in tokenizer "
            "is only used with random weights: with real weights its text embeddings would be meaningless")
    note = (f"STAND-IN (deterministic byte-level ids, not the real {wanted} tokenizer, which {where}; "
            "fine only because the weights are random)")
    return LoadedTokenizer(StandInTokenizer.for_model(name), name, note, stand_in=True)
