"""A STAND-IN processor for randomly initialised VLMs: the real HF processor classes and image
processors, with a small word-level tokenizer instead of the real one (which is not on this
machine and would not fit a scaled-down random LLM anyway).

Used by ``load_vlm(..., "random")``, the notebooks with random weights, and the tests. Never
used with real weights: a real checkpoint brings its own processor. This module holds what the
families share (the tokenizer, the chat templates); each family module builds its own processor
class around them (``standin_processor`` there).
"""

from __future__ import annotations

from typing import Any, Optional

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

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


def build_tokenizer(specials: dict[str, str], extra: dict[str, str], roles: list[str], bos: bool = False) -> Any:
    """A small word-level ``PreTrainedTokenizerFast`` (lower-cased words and punctuation) with a
    family's special tokens: ``specials`` (pad / unk / bos / eos), ``extra`` ones (its image and
    video placeholders among them: names ending in ``_token`` become the tokenizer's attributes, as
    ``image_token``), the chat ``roles``, and
    with ``bos`` the BOS token before every text (as Llama's tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special_words = list(dict.fromkeys([*specials.values(), *extra.values()]))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special_words + roles + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no space before punctuation
    if bos:
        first = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{first} $A", pair=f"{first} $A $B",
                                                           special_tokens=[(first, vocab[first])])
    extra_special = {k: v for k, v in extra.items() if k.endswith("_token")}  # tokenizer.image_token etc.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", extra_special_tokens=extra_special,
                                        **specials)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special_words if t not in
                                                                tokenizer.all_special_tokens]})
    return tokenizer


CHATML_SPECIALS = dict(pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>")  # ChatML tokenizers
CHATML_ROLES = ["user", "assistant", "system"]


def tower_blocks(vision_layers: Optional[int], depth: int, tower: str) -> int:
    """The blocks a random tower gets: ``vision_layers`` (1 to its real ``depth``) or all."""
    if vision_layers is not None and not 1 <= vision_layers <= depth:
        raise ValueError(f"vision_layers must be between 1 and {depth} (the {tower}'s depth), got {vision_layers}")
    return vision_layers or depth


def scaled_text_config(tokenizer: Any, text_layers: int, text_width: int, **more: Any) -> dict[str, Any]:
    """The shared settings of a scaled-down random LLM: ``text_layers`` x ``text_width`` (head dim
    64), the stand-in tokenizer's vocabulary and special ids; ``more`` adds or overrides."""
    heads = max(1, text_width // 64)  # head_dim 64 at any width that is a multiple of 64
    return dict(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
                num_attention_heads=heads, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id) | more


def answer_in_words(model: Any, tokenizer: Any) -> None:
    """Random logits: generate words (no special token), ``max_new_tokens`` of them."""
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, \
        tokenizer.bos_token_id
    gen.suppress_tokens = list(tokenizer.all_special_ids)


def scaled_llm_note(llm: str, llm_shape: tuple[int, int, int], text_layers: int, text_width: int, vocab: int) -> str:
    layers, width, real_vocab = llm_shape
    return (f"{llm} scaled down to {text_layers} layers x {text_width}, vocab {vocab} "
            f"(real: {layers} x {width}, vocab {real_vocab}); a word-level tokenizer")
