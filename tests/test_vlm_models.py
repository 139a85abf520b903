"""load_vlm: the known LLaVA ids as the real classes, random-init with the real vision tower
shape and a scaled-down LLM, a real HF processor whose placeholder count is what the model
expects, real weights only from a local copy, and clear errors."""

import pytest
import torch
from transformers import (CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration,
                          LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, LlavaProcessor,
                          Qwen2ForCausalLM, SiglipVisionModel)

import dymu_viz
from dymu_viz import vlm
from dymu_viz.vlm.models import VLM_MODELS

LLAVA, ONEVISION = "llava-hf/llava-1.5-7b-hf", "llava-hf/llava-onevision-qwen2-7b-ov-hf"
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    return vlm.load_vlm(LLAVA, "random", vision_layers=2)  # features come from layer -2: the first layer's output


@pytest.fixture(scope="module")
def onevision():
    torch.manual_seed(0)
    return vlm.load_vlm(ONEVISION, "random", vision_layers=1)


@pytest.fixture(scope="module")
def photos():
    images = dymu_viz.sample_photos(["chelsea", "grace_hopper"])  # landscape, portrait: 3 OneVision crops each
    return [image.resize((image.width // 2, image.height // 2)) for image in images.values()]


def test_random_llava_is_the_real_classes_with_the_real_tower_shape(llava):
    model, processor = llava.model, llava.processor
    assert type(model) is LlavaForConditionalGeneration and type(processor) is LlavaProcessor
    tower, llm = model.model.vision_tower, model.model.language_model
    assert isinstance(tower, CLIPVisionModel)
    v = model.config.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.image_size, v.patch_size, v.hidden_act) == \
        (1024, 4096, 16, 336, 14, "quick_gelu")
    assert len(tower.encoder.layers) == v.num_hidden_layers == 2  # cut to 2 of 24 for speed
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-2, "default")
    t = model.config.text_config
    assert type(LlamaForCausalLM(t).model).__name__ == type(llm).__name__ == "LlamaModel"
    assert (t.num_hidden_layers, t.hidden_size, t.vocab_size) == (2, 256, len(processor.tokenizer))
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_processor.crop_size == {"height": 336, "width": 336}
    assert not llava.pretrained and llava.weights.startswith("RANDOM init (asked for)")
    assert "CLIP ViT-L/14-336" in llava.weights and "2 of its 24 layers x 1024, 336 px, patch 14" in llava.weights
    assert "Llama-7B scaled down to 2 layers x 256" in llava.weights


def test_random_onevision_is_the_real_classes_with_the_real_tower_shape(onevision):
    model, processor = onevision.model, onevision.processor
    assert type(model) is LlavaOnevisionForConditionalGeneration and type(processor) is LlavaOnevisionProcessor
    assert isinstance(model.model.vision_tower, SiglipVisionModel)
    v = model.config.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_attention_heads, v.image_size, v.patch_size) == \
        (1152, 4304, 16, 384, 14)
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy,
            model.config.vision_aspect_ratio) == (-1, "full", "anyres_max_9")
    assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints
    assert len(model.config.image_grid_pinpoints) == 36 and max(map(max, model.config.image_grid_pinpoints)) == 2304
    assert type(Qwen2ForCausalLM(model.config.text_config).model).__name__ == type(model.model.language_model).__name__
    assert processor.num_image_tokens == 729 and model.config.text_config.vocab_size == len(processor.tokenizer)
    assert "SigLIP so400m-patch14-384" in onevision.weights and "Qwen2-7B scaled down" in onevision.weights


def test_known_ids_keep_the_real_depths():
    assert VLM_MODELS[LLAVA].vision["num_hidden_layers"] == 24
    assert VLM_MODELS[ONEVISION].vision["num_hidden_layers"] == 26  # LLaVA-OV drops SigLIP's last layer


@pytest.mark.parametrize("which", ["llava", "onevision"])
def test_the_processors_placeholders_are_what_the_unpatched_model_expects(which, request, photos):
    loaded = request.getfixturevalue(which)
    prompt = loaded.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = loaded.processor(images=photos, text=[prompt] * 2, return_tensors="pt", padding=True)
    placeholders = (inputs.input_ids == loaded.model.config.image_token_id).sum(1).tolist()
    kwargs = {"image_sizes": inputs.image_sizes} if "image_sizes" in inputs else {}
    with torch.no_grad():
        features = loaded.model.model.get_image_features(pixel_values=inputs.pixel_values, **kwargs).pooler_output
    assert placeholders == [len(f) for f in features]
    if which == "llava":
        assert placeholders == [576, 576]
    else:
        assert placeholders[0] != placeholders[1] and min(placeholders) > 729  # AnyRes: base crop + tile grid


@pytest.mark.parametrize("which", ["llava", "onevision"])
def test_chat_runs_end_to_end_with_dymu(which, request, photos):
    loaded = request.getfixturevalue(which)
    prompt = loaded.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    question = QUESTION[0]["content"][-1]["text"]
    vlm.patch_vlm(loaded.model, thresholds=0.9)
    try:
        out = vlm.chat(loaded.model, loaded.processor, photos, [question] * 2, max_new_tokens=3)
    finally:
        vlm.unpatch_vlm(loaded.model)
    inputs = loaded.processor(images=photos, text=[prompt] * 2, return_tensors="pt", padding=True)
    placeholders = (inputs.input_ids == loaded.model.config.image_token_id).sum(1).tolist()
    assert [acc["image_positions"] for acc in out.accounting] == placeholders
    assert all(acc["image_tokens"] < acc["image_positions"] for acc in out.accounting)  # it merged
    assert out.sequences.shape == (2, 3) and all(t.strip() for t in out.texts)  # words: special tokens suppressed


def test_auto_without_a_local_copy_falls_back_to_random_and_says_so():
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(LLAVA, "config.json"), str):
        pytest.skip("the real LLaVA-1.5 weights are cached on this machine")
    loaded = vlm.load_vlm(LLAVA, vision_layers=1)
    assert not loaded.pretrained and loaded.weights.startswith("RANDOM init (no local copy of the weights)")
    with pytest.raises(FileNotFoundError, match="allow_download=True"):
        vlm.load_vlm(LLAVA, "pretrained")


def test_a_local_folder_loads_the_real_weights(llava, tmp_path, photos):
    llava.model.save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    loaded = vlm.load_vlm(LLAVA, str(tmp_path))
    assert loaded.pretrained and loaded.weights.startswith("pretrained LlavaForConditionalGeneration")
    for a, b in zip(loaded.model.state_dict().values(), llava.model.state_dict().values()):
        assert torch.equal(a, b)
    prompt = loaded.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert loaded.processor(images=photos[:1], text=prompt).input_ids == \
        llava.processor(images=photos[:1], text=prompt).input_ids


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown VLM 'llava-hf/llava-2'.*llava-1.5-7b-hf"):
        vlm.load_vlm("llava-hf/llava-2")
    with pytest.raises(ValueError, match="unknown VLM"):
        vlm.load_vlm("llava-hf/llava-2", "random")
    with pytest.raises(ValueError, match="pretrained must be"):
        vlm.load_vlm(LLAVA, "openai")
    with pytest.raises(FileNotFoundError, match="no local copy"):
        vlm.load_vlm(str(tmp_path))  # an empty folder
    with pytest.raises(ValueError, match="vision_layers must be between 1 and 24"):
        vlm.load_vlm(LLAVA, "random", vision_layers=30)


@pytest.mark.slow
@pytest.mark.parametrize("model_id,depth", [(LLAVA, 24), (ONEVISION, 26)])
def test_random_init_builds_the_whole_tower_by_default(model_id, depth):
    loaded = vlm.load_vlm(model_id, "random")
    layers = loaded.model.model.vision_tower.encoder.layers
    assert loaded.model.config.vision_config.num_hidden_layers == len(layers) == depth
    assert f"tower at its real shape ({depth} layers x " in loaded.weights


def test_half_precision_keeps_the_rope_frequencies_as_from_pretrained_does(llava, tmp_path, photos):
    """bfloat16 through load_vlm (a local folder, or random init) holds what HF's own
    ``from_pretrained(dtype=torch.bfloat16)`` holds: weights in bfloat16, RoPE's inverse
    frequencies in float32 (rounded to bfloat16, every rotary angle would drift); so the logits
    are HF's own, bit for bit."""
    from transformers import AutoModelForImageTextToText

    llava.model.save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    ours = vlm.load_vlm(LLAVA, str(tmp_path), "cpu", dtype=torch.bfloat16).model
    theirs = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    buffers = dict(theirs.named_buffers())
    assert buffers["model.language_model.rotary_emb.inv_freq"].dtype == torch.float32
    for name, buffer in ours.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    inputs = llava.processor(images=photos[:1], text=llava.processor.apply_chat_template(QUESTION, add_generation_prompt=True),
                             return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
    torch.manual_seed(0)
    random = vlm.load_vlm(LLAVA, "random", "cpu", dtype=torch.bfloat16, vision_layers=1).model
    assert random.model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    assert next(random.parameters()).dtype == torch.bfloat16


def test_the_kv_cache_goes_by_the_name_the_installed_transformers_gives_it(llava):
    """transformers 5.24 renamed the KV cache argument of every forward and the field of every
    output class from past_key_values to cache (the old name warns until 5.40); the patched
    forward reads, passes on and returns the cache under the name the model's own code uses, so
    on either side of the rename generate hands it over and gets it back."""
    import dataclasses

    import transformers

    from dymu_viz.versions import release
    from dymu_viz.vlm.forward import _output_class, cache_argument, cache_field

    def before(input_ids=None, past_key_values=None): ...

    def after(input_ids=None, cache=None): ...

    assert (cache_argument(before), cache_argument(after)) == ("past_key_values", "cache")
    old = dataclasses.make_dataclass("Old", [("logits", object, None), ("past_key_values", object, None)])
    new = dataclasses.make_dataclass("New", [("logits", object, None), ("cache", object, None)])
    assert (cache_field(old), cache_field(new)) == ("past_key_values", "cache")
    name = "cache" if release(transformers.__version__) >= (5, 24) else "past_key_values"
    assert cache_argument(type(llava.model.model.language_model).forward) == name
    assert cache_field(_output_class(llava.model)) == name
    vlm.patch_vlm(llava.model, 0.9)
    prompt = llava.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = llava.processor(images=[dymu_viz.shapes_image(3)], text=[prompt], return_tensors="pt")
    out = llava.model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = getattr(out, cache_field(type(out)))  # the prompt's compact tokens and the steps after it
    assert type(cache).__name__ == "DyMUCache"
    assert cache.compact_length() == llava.model.dymu_vlm.last[0]["llm_compact_length"] + 2
    vlm.unpatch_vlm(llava.model)


def test_an_untested_transformers_release_is_refused_by_name(llava, monkeypatch):
    """patch_vlm on a transformers release the suite did not pass on raises, naming the tested
    release and what was measured on that one; the environment variable lets a user go on."""
    import transformers

    from dymu_viz.versions import TESTED_TRANSFORMERS, UNTESTED_OK, check_transformers

    assert transformers.__version__.rsplit(".", 1)[0] in TESTED_TRANSFORMERS  # what the suite runs on
    monkeypatch.delenv(UNTESTED_OK, raising=False)
    monkeypatch.setattr(transformers, "__version__", "5.26.0")
    with pytest.raises(RuntimeError, match=r"tested with transformers 5\.19\.x to 5\.25\.x, not 5\.26\.0\. Install a "
                                           r"tested release \(pip install 'transformers>=5\.19,<5\.26'\)"):
        vlm.patch_vlm(llava.model, None)
    with pytest.raises(RuntimeError, match=r"not 5\.18\.0 \(measured on 5\.18: HF's own beam search repeats each image"):
        check_transformers("5.18.0")
    for minor in TESTED_TRANSFORMERS:
        check_transformers(f"{minor}.1")
    monkeypatch.setenv(UNTESTED_OK, "1")
    vlm.patch_vlm(llava.model, None)
    assert llava.model.dymu_vlm.mode == "vtu"
    vlm.unpatch_vlm(llava.model)
