"""DyMU in lmms-eval: the models registered through its entry points, run by its own CLI on the
offline ``dymu_photos`` task with tiny random LLaVA-1.5 / OneVision / Qwen2.5-VL / Qwen3-VL /
InternVL3 checkpoints saved to local folders (loaded with ``from_pretrained`` as real ones are);
``mode=full`` against lmms-eval's own HF LLaVA model (LLaVA families) or HF's own ``generate``
(Qwen families); the accounting in the logged samples and the summary in the results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dymu_viz.eval import (SUMMARY_KEYS, TASKS_DIR, baseline_arg, describe, load_results, models,  # noqa: E402
                           load_samples, run_cli, run_rows, summarize, summary_of_results, task_docs)
from tiny_models import tiny_internvl, tiny_qwen, tiny_qwen3, tiny_vlm  # noqa: E402

FAMILIES = {"llava": "dymu_llava", "onevision": "dymu_llava_onevision", "qwen2_vl": "dymu_qwen2_5_vl",
            "qwen3_vl": "dymu_qwen3_vl", "internvl": "dymu_internvl"}
TOWER_FAMILIES = ("llava", "onevision")  # DToMe inside the tower: its FLOPs are measured
DOCS = len(task_docs())  # 12 questions
TAU = 0.5  # merges a few of the tiny towers' 16 patches per crop
# what merges some of every family's image tokens, and how many depends on the image
MERGING = {"llava": str(TAU), "onevision": str(TAU), "qwen2_vl": "0.9/0.9/0.9", "qwen3_vl": "0.9/0.9/0.9",
           "internvl": "0.9/0.9/0.9"}


def tiny(family: str):
    factories = {"qwen2_vl": lambda: tiny_qwen("2.5"), "qwen3_vl": tiny_qwen3, "internvl": tiny_internvl}
    return factories.get(family, lambda: tiny_vlm(family))()


def harness_class(family: str) -> type:
    from dymu_viz.eval import harness

    return getattr(harness, models()[FAMILIES[family]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of every family, saved as HF folders (model + processor)."""
    folders = {}
    for family in FAMILIES:
        model, processor = tiny(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[family] = folder
    return folders


def run(model: str, model_args: str, batch_size: int, out: Path, processes: int = 1,
        docs: int = DOCS) -> tuple[list[dict], dict]:
    """lmms-eval's CLI on dymu_photos (``dymu_viz.eval.run_cli``), its first ``docs`` questions:
    the logged samples by doc id, and the results."""
    run_cli(model, model_args, out, batch_size=batch_size, device="cpu", processes=processes,
            extra=["--limit", str(docs)])
    samples = sorted(load_samples(out), key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(docs))
    return samples, load_results(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_logs_the_accounting_of_every_sample_and_its_summary(family, checkpoints, tmp_path):
    samples, results = run(FAMILIES[family], f"pretrained={checkpoints[family]},thresholds={MERGING[family]}", 2,
                           tmp_path)
    assert results["results"]["dymu_photos"]["accuracy,none"] == np.mean([s["accuracy"] for s in samples])
    records = [s["dymu"] for s in samples]
    for sample, r in zip(samples, records):
        counts = sample["token_counts"][0]
        assert r["mode"] == "vtu" and r["batch_size"] == 2 and str(r["thresholds"]) == MERGING[family]
        assert counts["input_tokens"] == r["llm_compact_length"] == r["text_tokens"] + r["image_tokens"]
        assert r["llm_virtual_length"] == r["text_tokens"] + r["image_positions"]
        assert r["encoder_tokens"] == sum(r["crop_tokens"]) and len(r["crop_tokens"]) >= 1
        assert r["kv_cache_entries"] == r["llm_compact_length"] + r["generated_tokens"] - 1  # the last token: not cached
        assert counts["output_tokens"] == r["output_tokens"] <= r["generated_tokens"]
        assert r["batch_peak_mib"] is None  # CUDA only
        assert r["prefill_flops"] > 0 and min(r[f"batch_{s}_s"] for s in ("vision", "prefill", "decode")) > 0
        assert r["images"] == 1
        # the tower's FLOPs: measured DToMe counts (LLaVA) or Qwen's vanilla tower; InternVL's rounds count none
        assert r["vision_flops"] is None if family == "internvl" else r["vision_flops"] > 0
    assert any(r["image_tokens"] < r["image_positions"] for r in records)  # DToMe merged something
    assert len({r["image_tokens"] for r in records}) > 1  # and how much depends on the image
    summary = summary_of_results(results)  # what the run reported, against numpy on the logged values
    for key in SUMMARY_KEYS:
        values = np.array([r[key] for r in records], dtype=float)
        expected = [values.mean(), values.std(), values.min(), np.median(values), values.max()]
        assert list(summary[key].values()) == pytest.approx(expected, rel=1e-12), key
    assert all(summary[key] == pytest.approx(stats) for key, stats in summarize(records).items())
    row, = run_rows({"dymu": tmp_path})  # the notebook's table
    assert row["accuracy"] == results["results"]["dymu_photos"]["accuracy,none"]
    assert ("gflops" in row) == (family != "internvl")  # no vision FLOPs: no total
    assert row["image_tokens"] == pytest.approx(summary["image_tokens"]["mean"]) and row["seconds"] > 0


def test_two_processes_log_every_sample_and_summarise_them_all(checkpoints, tmp_path):
    """accelerate launch --num_processes 2 (data parallel, as on 8 GPUs) on 11 questions: each
    process answers its share (lmms-eval pads the second with a copy); the summary covers every
    sample once, and equals the one-process run's."""
    args = f"pretrained={checkpoints['llava']},thresholds={TAU}"
    one, one_results = run("dymu_llava", args, 2, tmp_path / "one", docs=DOCS - 1)
    two, two_results = run("dymu_llava", args, 2, tmp_path / "two", processes=2, docs=DOCS - 1)
    assert [s["filtered_resps"] for s in two] == [s["filtered_resps"] for s in one]
    assert [s["dymu"]["image_tokens"] for s in two] == [s["dymu"]["image_tokens"] for s in one]
    assert summary_of_results(two_results) == summary_of_results(one_results)


@pytest.mark.parametrize("family", TOWER_FAMILIES)
def test_mode_full_answers_what_lmms_eval_own_llava_hf_answers(family, checkpoints, tmp_path):
    ours, _ = run(FAMILIES[family], f"pretrained={checkpoints[family]},mode=full", 2, tmp_path / "dymu")
    theirs, _ = run("llava_hf", f"pretrained={checkpoints[family]},device_map=cpu", 1, tmp_path / "hf")
    assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in theirs]
    assert sum(len(s["filtered_resps"].split()) for s in ours) >= DOCS  # real answers, not empty strings
    assert all(s["dymu"]["image_tokens"] == s["dymu"]["image_positions"] for s in ours)  # nothing merged


@pytest.mark.parametrize("family,theirs", [("qwen2_vl", "qwen2_5_vl"), ("qwen3_vl", "qwen3_vl")])
def test_mode_full_answers_what_lmms_eval_own_qwen_answers(family, theirs, checkpoints, tmp_path):
    """Qwen families: ``mode=full`` answers what lmms-eval's own Qwen model (its chat model)
    answers, answer for answer: the same turns, pictures resized as qwen_vl_utils and the
    processor resize them, in bfloat16 (theirs always loads in bfloat16). One question at a
    time on both sides: in bfloat16, left padding moves near-tied logits of these random models
    (1 of 12 Qwen3-VL answers changed at batch 2; in float32 batch 2 = batch 1, and the
    contract suite checks padding in float32)."""
    ours, _ = run(FAMILIES[family], f"pretrained={checkpoints[family]},mode=full,dtype=bfloat16", 1, tmp_path / "dymu")
    reference, _ = run(theirs, f"pretrained={checkpoints[family]},device_map=cpu", 1, tmp_path / "theirs")
    assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in reference]
    assert sum(len(s["filtered_resps"].split()) for s in ours) >= DOCS  # real answers, not empty strings
    assert all(s["dymu"]["image_tokens"] == s["dymu"]["image_positions"] for s in ours)  # nothing merged
    assert all(s["dymu"]["image_positions"] > 100 for s in ours)  # resized as theirs (the stand-in processor: <= 64)


def test_mode_full_answers_what_lmms_eval_own_internvl_hf_answers(checkpoints, tmp_path):
    """InternVL3: ``mode=full`` answers what lmms-eval's own InternVL model (``internvl_hf``, its
    chat model: the same turn through the processor's template, 1 to 12 tiles, bfloat16)
    answers, answer for answer, one question at a time on both sides."""
    ours, _ = run("dymu_internvl", f"pretrained={checkpoints['internvl']},mode=full,dtype=bfloat16", 1,
                  tmp_path / "dymu")
    reference, _ = run("internvl_hf", f"pretrained={checkpoints['internvl']},device_map=cpu", 1,
                       tmp_path / "theirs")
    assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in reference]
    assert sum(len(s["filtered_resps"].split()) for s in ours) >= DOCS  # real answers, not empty strings
    assert all(s["dymu"]["image_tokens"] == s["dymu"]["image_positions"] for s in ours)  # nothing merged
    assert all(len(s["dymu"]["crop_tokens"]) > 1 for s in ours)  # tiles and a thumbnail, as theirs


def evaluate(model_args: str, batch_size: int = 2, gen_kwargs: str | None = None) -> list[dict]:
    """lmms-eval's simple_evaluate in this process (the CLI's own entry, without a new interpreter)."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    results = simple_evaluate(model="dymu_llava", model_args=model_args, tasks=["dymu_photos"], batch_size=batch_size,
                              device="cpu", log_samples=True, gen_kwargs=gen_kwargs,
                              task_manager=TaskManager(include_path=str(TASKS_DIR)))
    return sorted(results["samples"]["dymu_photos"], key=lambda s: s["doc_id"])


def test_a_samples_record_does_not_depend_on_its_batch_or_beams(checkpoints):
    """Per-sample figures are the sample's own: the same alone, in a batch of 3 (where others
    run longer after it stops), and (the tower's) with 2 beams, whose rows repeat each crop."""
    args = f"pretrained={checkpoints['llava']},thresholds={TAU}"
    alone, batched = ([s["token_counts"][0]["dymu"] for s in evaluate(args, b)] for b in (1, 3))
    assert any(r["generated_tokens"] < 8 for r in alone) and any(r["generated_tokens"] == 8 for r in alone)
    own = ("image_tokens", "llm_compact_length", "generated_tokens", "output_tokens", "kv_cache_entries",
           "kv_key_entries", "vision_flops", "prefill_flops", "decode_flops")
    assert [[r[k] for k in own] for r in batched] == [[r[k] for k in own] for r in alone]
    beams = [s["token_counts"][0]["dymu"] for s in evaluate(args, 2, "num_beams=2")]
    assert all(r["num_beams"] == 2 for r in beams)
    assert [r["vision_flops"] for r in beams] == [r["vision_flops"] for r in alone]
    assert len({r["vision_flops"] for r in alone}) > 1  # the images differ, so a mix-up would show


def test_matched_budget_baselines_run_in_the_harness(checkpoints):
    from dymu_viz.vlm.baselines import Pool, RandomPrune, ToMe

    assert baseline_arg(ToMe((3, 3, 0))) == "tome=3/3/0" and baseline_arg(Pool(2, 2)) == "pool=2x2"
    assert baseline_arg(RandomPrune(5)) == "random=5" and baseline_arg(RandomPrune(5, 2)) == "random=5,seed=2"
    # random pruning: 5 patches per image; the same seed gives the same answers in any batch
    pruned = [evaluate(f"pretrained={checkpoints['llava']},{baseline_arg(RandomPrune(5, 2))}", batch_size=b)
              for b in (1, 3)]
    assert all(s["token_counts"][0]["dymu"]["image_tokens"] == 5 and str(s["token_counts"][0]["dymu"]["seed"]) == "2"
               for s in pruned[0])
    assert [s["resps"] for s in pruned[0]] == [s["resps"] for s in pruned[1]]
    pooled = evaluate(f"pretrained={checkpoints['llava']},{baseline_arg(Pool(2, 2))}")
    assert all(s["token_counts"][0]["dymu"]["image_tokens"] == 4 for s in pooled)
    # ToMe: r = 3 in both tower layers LLaVA reads (vision_feature_layer -2 of 3): 16 - 6 = 10 tokens per image
    tome = evaluate(f"pretrained={checkpoints['llava']},tome=3/3/0", batch_size=3)
    records = [s["token_counts"][0]["dymu"] for s in tome]
    assert all(r["image_tokens"] == 10 and r["tome"] == "3/3/0" and r["batch_size"] == 3 for r in records)


def test_model_arguments_fail_clearly(checkpoints):
    from transformers import LlavaForConditionalGeneration

    from dymu_viz.eval.harness import DyMULlava, DyMULlavaOneVision, parse_setting
    from dymu_viz.vlm.baselines import RandomPrune

    with pytest.raises(ValueError, match="give one of thresholds, tome, pool and random, not thresholds and tome"):
        parse_setting("llava", 0.9, "3", None)
    with pytest.raises(ValueError, match="random must be the patches kept per crop"):
        parse_setting("llava", None, None, None, "half")
    with pytest.raises(ValueError, match="seed= is the draw of random pruning"):
        parse_setting("llava", 0.9, None, None, None, "3")
    assert parse_setting("llava", None, None, None, "144", "7") == RandomPrune(144, 7)
    assert parse_setting("qwen2_vl", "0.9/0.8/1e9", None, None) == [0.9, 0.8, 1e9]
    with pytest.raises(FileNotFoundError, match="thresholds=runs/0.9/t.json: no such file"):
        parse_setting("llava", "runs/0.9/t.json", None, None)  # a path, not values
    with pytest.raises(ValueError, match="pool must be ROWSxCOLS"):
        parse_setting("llava", None, None, "4by4")
    with pytest.raises(ValueError, match="no published thresholds for DyMU-mid.*--target 192out"):
        parse_setting("llava", "mid", None, None)
    with pytest.raises(ValueError, match="LLaVA-1.5's published DyMU-low"):
        parse_setting("onevision", "low", None, None)
    assert parse_setting("llava", "low", None, None).values[0] == 0.99609375
    with pytest.raises(ValueError, match="--batch_size auto is not supported"):
        DyMULlava(pretrained=str(checkpoints["llava"]), batch_size="auto:4")
    assert parse_setting("llava", "None", None, None) is None
    assert parse_setting("llava", None, "none", "NONE") is None
    with pytest.raises(ValueError, match="unknown model argument"):
        DyMULlava(pretrained=str(checkpoints["llava"]), treshold=0.9)
    with pytest.raises(ValueError, match="runs LlavaOnevisionForConditionalGeneration"):
        DyMULlavaOneVision(pretrained=str(checkpoints["llava"]))
    # weights=random: the hub id's classes at random, here with a 1-block tower, so the 24-layer
    # published thresholds do not fit it
    random = DyMULlava(pretrained="llava-hf/llava-1.5-7b-hf", weights="random", vision_layers=1)
    assert isinstance(random.model, LlavaForConditionalGeneration) and random.model.dymu_vlm.mode == "vtu"
    with pytest.raises(ValueError, match="have 24 layers but the encoder has 1"):
        DyMULlava(pretrained="llava-hf/llava-1.5-7b-hf", weights="random", vision_layers=1, thresholds="low")


def test_rows_table_flags_settings_slower_than_full():
    from dymu_viz.eval import rows_table

    rows = [{"setting": "full", "accuracy": 0.5, "image_tokens": 576.0, "image_tokens_std": 0.0, "seconds": 0.4,
             "gflops": 50.0},
            {"setting": "DyMU", "accuracy": 0.5, "image_tokens": 90.0, "image_tokens_std": 27.0, "seconds": 0.2,
             "gflops": 20.0},
            {"setting": "pool", "accuracy": 0.4, "image_tokens": 90.0, "image_tokens_std": 0.0, "seconds": 0.5,
             "gflops": 48.0}]
    lines = rows_table(rows).splitlines()
    assert lines[2].endswith("| 1.00 |") and lines[3].endswith("| 0.50 |") and lines[4].endswith("| 1.25 SLOWER |")
    assert "90.0 ± 27.0" in lines[3]


def test_describe_is_population_statistics():
    assert describe([1, 2, 3, 10]) == pytest.approx({"mean": 4.0, "std": np.std([1, 2, 3, 10]), "min": 1,
                                                     "median": 2.5, "max": 10})
    with pytest.raises(ValueError, match="no values"):
        describe([])


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.mark.parametrize("family", FAMILIES)
def test_loglikelihood_is_the_vanilla_models_in_full_mode(family, checkpoints, no_grad):
    from transformers import AutoModelForImageTextToText

    from dymu_viz.data import sample_photos
    cls = harness_class(family)
    photo = sample_photos(["chelsea"])["chelsea"]
    ours = cls(pretrained=str(checkpoints[family]), mode="full")
    ours.task_dict = {"t": {"test": [{"image": photo}]}}
    request = _Request("What is shown?", " a cat", lambda doc: [doc["image"]], 0, "t", "test")
    (logprob, greedy), = ours.loglikelihood([request])

    vanilla = AutoModelForImageTextToText.from_pretrained(checkpoints[family]).eval()
    prompt = ours._inputs(["What is shown?"], [[photo]])  # the prompt and pictures the harness builds
    target = ours.tokenizer(" a cat", add_special_tokens=False, return_tensors="pt").input_ids[0]
    start = prompt["input_ids"].shape[1]
    ids = torch.cat([prompt["input_ids"][0], target])[None]
    images = {k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in images:  # Qwen: the continuation is text (type 0)
        images["mm_token_type_ids"] = torch.cat([images["mm_token_type_ids"][0], torch.zeros_like(target)])[None]
    logits = vanilla(input_ids=ids, **images).logits[0, start - 1:-1].log_softmax(-1)
    assert logprob == pytest.approx(float(logits.gather(1, target[:, None]).sum()), abs=1e-4)
    assert greedy == bool((logits.argmax(-1) == target).all())

    merged = cls(pretrained=str(checkpoints[family]), thresholds=MERGING[family])  # VTU on merged tokens: changed
    merged.task_dict = ours.task_dict
    (logprob_merged, _), = merged.loglikelihood([request])
    assert np.isfinite(logprob_merged) and logprob_merged != pytest.approx(logprob, abs=1e-6)


@pytest.mark.parametrize("model_args,message", [
    ("treshold=0.9", "unknown model argument.*treshold"),
    ("thresholds=no_such_file.json", "thresholds=no_such_file.json: no such file.*presets are lower case"),
    ("thresholds=Low", "thresholds=Low: no such file, and not a number, none or a preset \\(high, low, mid"),
    ("mode=fast", "unknown mode 'fast'"),
    ("random=100", "random pruning keeps 1 to 16 of a 4 x 4 patch grid, got 100"),
    ("pretrained=no/such/folder", "cannot load pretrained=no/such/folder.*download=true.*weights=random"),
], ids=["misspelled", "missing_file", "preset_case", "bad_mode", "random_too_many", "missing_model"])
def test_a_failed_evaluation_exits_non_zero_through_the_cli(model_args, message, checkpoints, tmp_path):
    """lmms-eval 0.7 logs a model's errors and exits 0; a DyMU model ends the run with status 1
    and its own message instead (each user mistake through lmms-eval's CLI, as a script runs it)."""
    import re

    prefix = "" if model_args.startswith("pretrained=") else f"pretrained={checkpoints['llava']},"
    with pytest.raises(RuntimeError) as failed:
        run_cli("dymu_llava", prefix + model_args, tmp_path, device="cpu", extra=["--limit", "2"])
    text = str(failed.value)
    assert text.startswith("lmms-eval exited with 1:"), text[:300]
    assert re.search("dymu_llava failed: .*" + message, text), text[-2000:]
    assert not (tmp_path.exists() and any(tmp_path.rglob("*samples*.jsonl")))  # nothing that looks like a result


@pytest.mark.parametrize("response,right", [
    ("B", True), ("b", True), ("B.", True), (" (B) ", True), ("B)", True), ("B. an astronaut", True),
    ("(b) an astronaut", True), ("B: an astronaut", False), ("C", False), ("C. a cyclist", False),
    ("a in a in a in a in", False), ("A cat", False), ("an astronaut", False), ("", False), ("BA", False),
    ("Both", False), ("B B B", False)])
def test_dymu_photos_counts_an_option_only_when_it_is_chosen(response, right):
    """The answer to question 0 is B: a letter alone or marked ("(B)", "B.") counts; a first word
    that merely is a letter (the article in "a in a ...") or another option does not."""
    from dymu_viz.eval.tasks.dymu_photos.utils import process_results

    doc = task_docs()[0]
    assert doc["answer"] == "B" and doc["kind"] == "choice"
    assert process_results(doc, [response]) == {"accuracy": float(right)}


@pytest.mark.parametrize("response,right", [("Yes", True), ("yes.", True), ("Yes, there is.", True), ("no", False),
                                            ("a in a in", False), ("", False)])
def test_dymu_photos_yes_no_reads_the_first_word(response, right):
    from dymu_viz.eval.tasks.dymu_photos.utils import process_results

    doc = next(d for d in task_docs() if d["kind"] == "yes_no" and d["answer"].lower() == "yes")
    assert process_results(doc, [response]) == {"accuracy": float(right)}


# ---------------------------------------------------------------- budgets and requests, called directly


def requests(model, docs: list[dict], gen_kwargs: dict, kind: str = "generate_until") -> list:
    """lmms-eval requests over ``docs`` (each: a question and its pictures), as its evaluator
    builds them, with the docs set as the model's task."""
    from lmms_eval.api.instance import Instance

    model.task_dict = {"t": {"test": docs}}
    return [Instance(kind, (d["question"], dict(gen_kwargs), lambda doc: doc["images"], i, "t", "test"), i,
                     metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, d in enumerate(docs)]


def logged_tokens(model, docs: list[dict]) -> list[int]:
    return [r.token_counts.dymu["image_tokens"] for r in model.generate_until(requests(model, docs, {"max_new_tokens": 1}))]


def test_a_budget_measured_through_the_harness_processor_is_what_the_harness_logs(checkpoints):
    """Qwen's grids follow the picture size, and an lmms-eval run resizes pictures first (as
    qwen_vl_utils does) within its own pixel bounds: a budget matched through
    ``HarnessProcessor`` holds in the run, pictures of very different sizes included, where
    the plain processor measures other grids."""
    from dymu_viz.data import sample_photos
    from dymu_viz.eval import HarnessProcessor
    from dymu_viz.vlm.baselines import image_token_counts, match_budget

    photos = sample_photos(["astronaut", "chelsea", "rocket"])
    pictures = [photos["astronaut"], photos["chelsea"].resize((300, 200)), photos["rocket"].resize((900, 300))]
    docs = [{"question": "What is it?", "images": [p]} for p in pictures]
    cls = harness_class("qwen2_vl")
    dymu = cls(pretrained=str(checkpoints["qwen2_vl"]), thresholds=MERGING["qwen2_vl"], batch_size=3)
    per_sample = logged_tokens(dymu, docs)
    target = sum(per_sample) / len(per_sample)
    measuring = HarnessProcessor(dymu.model, dymu.processor)
    assert image_token_counts(dymu.model, measuring, pictures) == per_sample
    assert image_token_counts(dymu.model, dymu.processor, pictures) != per_sample  # the premise: sizes differ
    for kind in ("pool", "tome"):
        baseline = match_budget(dymu.model, measuring, pictures, target, kind)
        run = cls(pretrained=str(checkpoints["qwen2_vl"]), batch_size=3, **dict([baseline_arg(baseline).split("=")]))
        assert sum(logged_tokens(run, docs)) / len(docs) == baseline.measured


def test_a_pooling_grid_too_large_for_a_picture_fails_before_any_answer(checkpoints, monkeypatch):
    """A panorama's unit grid is 11 units high: pool=16x16 fits the astronaut (18 x 18) but not
    it, and the run stops before generating anything, naming the sample."""
    from dymu_viz.data import sample_photos
    from dymu_viz.eval import harness

    monkeypatch.setattr(harness.vlm, "generate", lambda *args, **kwargs: pytest.fail("generated before the check"))
    photo = sample_photos(["astronaut"])["astronaut"]
    docs = [{"question": "What is it?", "images": [p]} for p in (photo, photo.resize((2400, 300)))]
    model = harness_class("qwen2_vl")(pretrained=str(checkpoints["qwen2_vl"]), pool="16x16")
    with pytest.raises(ValueError, match="sample 1: cannot pool a 11 x 86 patch grid to 16 x 16 cells; match"):
        model.generate_until(requests(model, docs, {"max_new_tokens": 1}))


def test_a_budget_per_sample_of_several_images_is_matched_per_sample(checkpoints):
    """A task with two pictures per question: samples given as lists are measured together, as
    one prompt, so the matched baseline's logged tokens per sample meet DyMU's per sample."""
    from dymu_viz.data import sample_photos
    from dymu_viz.eval import HarnessProcessor
    from dymu_viz.vlm.baselines import match_budget, mean_image_tokens

    photos = list(sample_photos().values())
    samples = [[photos[i], photos[i + 1]] for i in range(0, 6, 2)]
    docs = [{"question": "Compare them.", "images": s} for s in samples]
    cls = harness_class("llava")
    dymu = cls(pretrained=str(checkpoints["llava"]), thresholds=TAU, batch_size=2)
    per_sample = logged_tokens(dymu, docs)
    measuring = HarnessProcessor(dymu.model, dymu.processor)
    assert mean_image_tokens(dymu.model, measuring, samples) == sum(per_sample) / len(docs)
    baseline = match_budget(dymu.model, measuring, samples, sum(per_sample) / len(docs), "pool")
    pooled = cls(pretrained=str(checkpoints["llava"]), pool=f"{baseline.rows}x{baseline.cols}", batch_size=2)
    records = [r.token_counts.dymu for r in pooled.generate_until(requests(pooled, docs, {"max_new_tokens": 1}))]
    assert all(r["images"] == 2 for r in records)
    assert sum(r["image_tokens"] for r in records) / len(docs) == baseline.measured == 2 * baseline.rows * baseline.cols


def test_answers_are_cut_at_until_only_when_asked_and_qwen_answers_128_tokens_by_default(checkpoints, monkeypatch):
    """lmms-eval's chat models (which the harness follows) never cut at a task's ``until`` and
    Qwen's answer up to 128 new tokens when the task sets none; ``stop_at_until=true`` cuts."""
    from dymu_viz.data import sample_photos
    from dymu_viz.eval import harness

    asked = []

    def generate(model, **kwargs):  # what the harness asks for, shortened to keep the test quick
        asked.append(kwargs["max_new_tokens"])
        return original(model, **{**kwargs, "max_new_tokens": 6})
    original = harness.vlm.generate
    monkeypatch.setattr(harness.vlm, "generate", generate)
    docs = [{"question": "What is it?", "images": [sample_photos(["coffee"])["coffee"]]}]
    cls = harness_class("qwen2_vl")
    model = cls(pretrained=str(checkpoints["qwen2_vl"]), mode="full")
    answer = model.generate_until(requests(model, docs, {}))[0].text
    assert asked == [128] and len(answer.split()) > 2
    stop = " " + answer.split()[1]
    assert model.generate_until(requests(model, docs, {"until": [stop]}))[0].text == answer
    cutting = cls(pretrained=str(checkpoints["qwen2_vl"]), mode="full", stop_at_until="true")
    assert cutting.generate_until(requests(cutting, docs, {"until": [stop]}))[0].text == answer.split(stop)[0]


def test_text_only_loglikelihood_and_unsupported_requests(checkpoints):
    """A question without a picture is scored like the others; a request kind the harness does
    not answer ends an lmms-eval run with a non-zero status instead of an empty result."""
    from dymu_viz.eval.harness import EvaluationFailed

    model = harness_class("llava")(pretrained=str(checkpoints["llava"]), thresholds=TAU)
    model.task_dict = {"t": {"test": [{"images": None}]}}
    (logprob, _), = model.loglikelihood([_Request("Say yes.", " yes", lambda doc: doc["images"], 0, "t", "test")])
    assert np.isfinite(logprob) and logprob < 0
    model.exits_on_error = True  # as lmms-eval builds it
    for method in (model.generate_until_multi_round, model.generate_visual_cot):
        with pytest.raises(EvaluationFailed, match="answers single-round tasks only"):
            method([])


def test_results_are_read_per_task_with_lmms_evals_aggregated_metric(tmp_path):
    """A run of several tasks: samples and rows are read for the task named; the metric is the
    one lmms-eval aggregated (pope-style per-sample dicts are not averaged); a summary that
    misses samples (answers served by --use_cache) is refused."""
    import json

    record = {"image_tokens": 90, "vision_flops": 1e9, "prefill_flops": 1e9, "decode_flops": 0.0, "batch_vision_s": 0.1,
              "batch_prefill_s": 0.1, "batch_decode_s": 0.1, "batch_size": 1}
    for task in ("pope", "mme"):
        lines = [json.dumps({"doc_id": i, "token_counts": [{"dymu": record}], f"{task}_score": {"score": 1.0}})
                 for i in range(2)]
        (tmp_path / f"x_samples_{task}.jsonl").write_text("\n".join(lines))
    results = {"results": {"pope": {"pope_score,none": 0.75, "pope_score_stderr,none": 0.1}, "mme": {"mme_score,none": 0.5}},
               "n-samples": {"pope": {"effective": 2}, "mme": {"effective": 2}},
               "throughput": {f"avg_dymu_{k}_{s}": 1.0 for k in SUMMARY_KEYS for s in ("mean", "std", "min", "median", "max")}}
    (tmp_path / "x_results.json").write_text(json.dumps({**results, "throughput": {**results["throughput"],
                                                                                   "avg_dymu_samples": 4}}))
    with pytest.raises(ValueError, match="holds 2 logged-sample files; name the task"):
        load_samples(tmp_path)
    assert len(load_samples(tmp_path, "mme")) == 2
    row, = run_rows({"DyMU": tmp_path}, "pope_score", task="pope")
    assert row["pope_score"] == 0.75 and row["gflops"] == 2.0 and row["samples"] == 2
    with pytest.raises(ValueError, match="task pope reports no metric 'accuracy'; it reports pope_score"):
        run_rows({"DyMU": tmp_path}, "accuracy", task="pope")
    assert summary_of_results(load_results(tmp_path))["image_tokens"]["mean"] == 1.0
    with pytest.raises(ValueError, match="covers 2 of the run's 4 samples: answers served by --use_cache"):
        summary_of_results({**results, "throughput": {**results["throughput"], "avg_dymu_samples": 2}})
