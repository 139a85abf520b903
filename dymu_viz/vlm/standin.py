"""A STAND-IN processor for randomly initialised VLMs: the real HF processor classes and image
processors, with a small word-level tokenizer instead of the real one (which is not on this
machine and would not fit a scaled-down random LLM anyway).

Used by ``load_vlm(..., "random")``, the notebooks with random weights, and the tests. Never
used with real weights: a real checkpoint brings its own processor.
"""

from __future__ import annotations

from typing import Any, Optional

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# The small word-level vocabulary of the random-init tokenizer: enough for prompts and a
# readable (random) answer. Words outside it become <unk>.
WORDS = """
a an the this that these those it its is are was were be been has have had do does did not no yes
and or but of in on at to from with without by for as into over under above below near behind between
what which who where when why how many much some any all each one two three four five six seven eight
nine ten first second left right top bottom middle front back up down out here there very more most
image picture photo photograph scene view describe tell me about show shows see seen look looks like
color colour colors red green blue yellow white black brown orange pink purple gray grey dark light
bright small large big little long short tall round square flat old new young
man woman person people boy girl child face hair eye eyes hand hands head
cat cats dog animal bird fish horse flower flowers plant tree trees grass leaf leaves
sky cloud clouds sun moon star stars space planet earth galaxy water sea river lake beach mountain
road street building house city wall window door room table chair cup coffee mug plate food
rocket launch smoke fire car bike boat train plane astronaut suit flag helmet
text word words letter number sign background foreground object objects shape shapes pattern texture
cell cells tissue stain microscope sample uniform officer navy portrait painting drawing
sitting standing lying holding wearing looking flying walking running
there's it's i you we they he she his her their my your our
. , ? ! : ; ' " ( ) -
""".split()


def build_tokenizer(family: str) -> Any:
    """A small word-level ``PreTrainedTokenizerFast`` (lower-cased words and punctuation) with
    the special tokens of the family's real tokenizer (Llama: ``<s>`` BOS; Qwen2: ChatML)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if family == "llava":
        specials = dict(pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        extra = {"image_token": "<image>"}
        chat = ["user", "assistant"]
    elif family == "qwen":
        specials = dict(pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>")
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "im_start": "<|im_start|>",
                 "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
        chat = ["user", "assistant", "system"]
    else:
        specials = dict(pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>")
        extra = {"image_token": "<image>", "video_token": "<video>", "im_start": "<|im_start|>"}
        chat = ["user", "assistant", "system"]
    special_words = list(dict.fromkeys([*specials.values(), *extra.values()]))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special_words + chat + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no space before punctuation
    if family == "llava":  # Llama's tokenizer starts every text with <s>
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", vocab["<s>"])])
    extra_special = {k: v for k, v in extra.items() if k in ("image_token", "video_token")}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", extra_special_tokens=extra_special,
                                        **specials)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_words if t not in
                                                                tokenizer.all_special_tokens]})
    return tokenizer


# Chat templates written after the real processors' prompt formats (OneVision: a sample's images
# adjacent, <image><image>, then the text).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QWEN_VL_TEMPLATE = (  # Qwen2-VL's: every image (video) as <|vision_start|><|image_pad|> (<|video_pad|>) <|vision_end|>
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ '\n' + c['text'] }}{% endfor %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def standin_processor(family: str, size: int, patch: int, select_strategy: str,
                      pinpoints: Optional[list[list[int]]] = None, aspect_ratio: Optional[str] = None) -> Any:
    """The family's real HF processor class ("llava": ``LlavaProcessor``, "onevision":
    ``LlavaOnevisionProcessor``) with HF's own image processor at ``size`` px (``patch`` px
    patches) and the stand-in tokenizer of ``build_tokenizer``, chat template included. For
    "qwen" see ``qwen_standin_processor``."""
    from transformers import (CLIPImageProcessor, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, LlavaProcessor)

    tokenizer = build_tokenizer(family)
    if family == "llava":
        images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                    image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch, image_token="<image>",
                              vision_feature_select_strategy=select_strategy, num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)
    norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = LlavaOnevisionImageProcessor(size={"height": size, "width": size}, **norm, image_grid_pinpoints=pinpoints)
    videos = LlavaOnevisionVideoProcessor(size={"height": size, "width": size}, **norm)
    return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                   num_image_tokens=(size // patch) ** 2,
                                   vision_feature_select_strategy=select_strategy, vision_aspect_ratio=aspect_ratio,
                                   chat_template=CHATML_TEMPLATE)


def qwen_standin_processor(version: str, patch: int = 14, min_pixels: int = 56 * 56,
                           max_pixels: int = 28 * 28 * 1280) -> Any:
    """Qwen2-VL / Qwen2.5-VL (version "2" or "2.5"): the real processor class with HF's own
    Qwen2-VL image processor (2 x 2 patch units, dynamic resolution between min_pixels and
    max_pixels) and the stand-in tokenizer with Qwen's vision tokens."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer("qwen")
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    images = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    videos = Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=2, temporal_patch_size=2)
    cls = {"2": Qwen2VLProcessor, "2.5": Qwen2_5_VLProcessor}[version]
    return cls(image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=QWEN_VL_TEMPLATE)
