"""The lmms-eval models: HF LLaVA-1.5, LLaVA-OneVision, Qwen2-VL / Qwen2.5-VL and Qwen3-VL patched
with DyMU, batched, with DyMU's accounting in every logged sample and a summary at the end of the
run.

Model arguments (``--model_args key=value,...``):

* ``pretrained``: a hub id or a local HF folder; ``weights=random`` builds the id's classes at
  random (``dymu_viz.vlm.load_vlm``; ``vision_layers`` cuts the tower) to try the harness anywhere;
* ``thresholds``: ``none`` (no merging), ``low`` (LLaVA-1.5: the reference authors' published
  72out thresholds, the paper's DyMU-low), a number (one tau in every layer), values separated by
  ``/`` (one per tower layer, or per DToMe round for the Qwen families), or a thresholds file
  (``dymu-viz calibrate ... --out FILE``, ``dymu-viz calibrate-rounds`` for Qwen; a reference
  ``.pth`` works too); ``metric``, ``window``, ``temporal``: the Qwen rounds' options, as in
  ``patch_vlm``; ``min_pixels`` / ``max_pixels``: the Qwen families' picture bounds;
* ``tome=R`` (ToMe with r merges in every layer LLaVA reads, or ``r0/r1/...`` per layer),
  ``pool=RxC`` (average pooling of each crop to R x C cells) or ``random=K`` (K patches of each
  crop kept at random, ``seed=S``, default 0) instead: the matched-budget baselines;
* ``mode``: ``vtu`` (default), ``compact`` (the paper's w/o VTU) or ``full`` (nothing merged);
  ``kernel`` and ``cache``: as in ``dymu_viz.vlm.patch_vlm``;
* ``dtype`` (``auto``: bfloat16 on a GPU, float32 on a CPU), ``device``, ``batch_size``,
  ``chat_template``, ``download`` (default true: a hub id is fetched as lmms-eval's own models do);
* ``stop_at_until`` (default false): cut answers at the task's stop sequences, as lmms-eval's
  simple models do (its chat models, which these follow, do not).

Prompts are the user turn lmms-eval's own (chat) model of the family builds (``llava_hf``,
``qwen2_5_vl``, ``qwen3_vl``, ``internvl_hf``: the family's ``lmms_*`` hooks prepare the pictures as theirs
do, ``dymu_viz.eval.HarnessProcessor``), through the processor's chat template, with their default
``max_new_tokens`` (``VLMFamily.lmms_max_new_tokens``), so ``mode=full`` answers what theirs answers;
unlike them, batches of any size run (left padded).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from loguru import logger
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from tqdm import tqdm

from .. import vlm
from ..models import DTYPES
from ..thresholds import Thresholds
from ..vlm.family import FAMILIES, family_named
from ..vlm.pipeline import images_per_prompt
from ..vlm.reductions import Pool, RandomPrune, ToMe, check_reduction
from ..vlm.costs import forward_times, llm_decode_flops, llm_prefill_flops, tower_crop_flops
from . import MAX_PIXELS, MIN_PIXELS, HarnessProcessor, flat_summary, summarize, summary_table

CALIBRATE_HINT = {"mid": "192out", "high": "384out"}


class DyMUTokenCounts(TokenCounts):
    """lmms-eval's per-sample counters (input tokens: the prompt the LLM computed, compact) plus
    DyMU's record, which ``to_dict`` writes into the logged sample under "dymu"."""

    def __init__(self, input_tokens: int, output_tokens: int, dymu: dict[str, Any]):
        super().__init__(input_tokens=input_tokens, output_tokens=output_tokens)
        self.dymu = dymu

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "dymu": self.dymu}


def _given(value: Any) -> bool:
    """A model argument counts as given unless absent, empty or "none" (any case)."""
    return value is not None and str(value).lower() not in ("", "none")


def _flag(name: str, value: Any) -> bool:
    """A true / false model argument."""
    text = str(value).lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return text in ("true", "1", "yes")


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_setting(family_name: str, thresholds: Any, tome: Any, pool: Any, random: Any = None,
                  seed: Any = None) -> Any:
    """What ``patch_vlm`` gets from the model arguments of the family ``family_name``:
    Thresholds, a float, ToMe, Pool, RandomPrune or None."""
    family = family_named(family_name)
    given = [name for name, value in (("thresholds", thresholds), ("tome", tome), ("pool", pool), ("random", random))
             if _given(value)]
    if len(given) > 1:
        raise ValueError(f"give one of thresholds, tome, pool and random, not {' and '.join(given)}")
    if seed is not None and not _given(random):
        raise ValueError("seed= is the draw of random pruning; give it with random=K")
    if _given(random):
        if not str(random).isdigit() or (seed is not None and not str(seed).isdigit()):
            raise ValueError(f"random must be the patches kept per crop and seed a whole number, e.g. random=144,seed=1; "
                             f"got random={random!r}" + ("" if seed is None else f", seed={seed!r}"))
        return RandomPrune(int(random), int(seed or 0))
    if _given(tome):
        return ToMe(tuple(int(r) for r in str(tome).split("/")))
    if _given(pool):
        rows, _, cols = str(pool).lower().partition("x")
        if not (rows.isdigit() and cols.isdigit()):
            raise ValueError(f"pool must be ROWSxCOLS, e.g. pool=10x9, got {pool!r}")
        return Pool(int(rows), int(cols))
    if not _given(thresholds):
        return None
    text = str(thresholds)
    if text in family.presets:
        return Thresholds.published(family.presets[text])
    elsewhere = [f.title for f in FAMILIES.values() if text in f.presets]
    if elsewhere:
        raise ValueError(f"thresholds={text} is {' and '.join(elsewhere)}'s published DyMU-{text}; for {family.title} pass "
                         "a thresholds file calibrated on its tower (dymu-viz calibrate)")
    values = [_number(v) for v in text.split("/")]
    if None not in values:  # one number, or one per layer / round (a path is a file)
        return values[0] if len(values) == 1 else values
    if text in CALIBRATE_HINT:
        raise ValueError(f"no published thresholds for DyMU-{text}: calibrate them once (dymu-viz calibrate --target "
                         f"{CALIBRATE_HINT[text]} --out FILE, see the README) and pass thresholds=FILE")
    try:
        return Thresholds.load(text)
    except FileNotFoundError:
        presets = sorted({name for f in FAMILIES.values() for name in f.presets} | CALIBRATE_HINT.keys())
        raise FileNotFoundError(f"thresholds={text}: no such file, and not a number, none or a preset "
                                f"({', '.join(presets)}; presets are lower case)") from None


def build_prompt(processor: Any, context: str, n_images: int, chat_template: Optional[str],
                 placeholder: str = "<image>", system: Optional[str] = None) -> str:
    """The user turn lmms-eval's chat models build (the images, then the question) through the
    processor's chat template (or ``chat_template``), after a ``system`` turn if given; a
    question that already holds image ``placeholder``s keeps them where they are."""
    images = [] if placeholder in context else [{"type": "image"}] * n_images
    turn = [{"role": "user", "content": images + [{"type": "text", "text": context}]}]
    system_turn = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    turns = system_turn + turn
    return processor.apply_chat_template(turns, chat_template=chat_template, tokenize=False, add_generation_prompt=True)


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first stop sequence."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class EvaluationFailed(SystemExit):
    """An error in a run that lmms-eval started: lmms-eval 0.7 logs the errors of its models and
    exits 0, so a script or a cluster job would take a failed evaluation for a finished one. A
    SystemExit is not caught there: the process ends with status 1 and this message."""

    def __init__(self, model_name: str, error: BaseException):
        super().__init__(f"{model_name} failed: {type(error).__name__}: {error}")


def _failing_the_run(method: Any) -> Any:
    """A model method whose error ends an lmms-eval run with a non-zero status (see EvaluationFailed)."""
    @functools.wraps(method)
    def wrapped(self: "DyMUModel", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as err:
            if not self.exits_on_error:
                raise
            logger.error(f"{self.model_name()}: {type(err).__name__}: {err}")
            raise EvaluationFailed(self.model_name(), err) from err
    return wrapped


class DyMUModel(lmms):
    """An lmms-eval model for the VLM family named ``family`` (a subclass per family sets it; the
    module docstring lists the arguments). Built by lmms-eval (``--model_args``), any error ends
    the run with a non-zero exit status; built directly, its errors are raised as they are."""

    is_simple = True
    family = ""
    exits_on_error = False

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "DyMUModel":
        try:
            model = super().create_from_arg_string(arg_string, additional_config)
        except Exception as err:
            logger.error(f"{cls.model_name()}: {type(err).__name__}: {err}")
            raise EvaluationFailed(cls.model_name(), err) from err
        model.exits_on_error = True
        return model

    def __init__(self, pretrained: Optional[str] = None, thresholds: Any = None, tome: Any = None, pool: Any = None,
                 random: Any = None, seed: Any = None, metric: Optional[str] = None, window: Any = None,
                 temporal: Any = None, min_pixels: Any = MIN_PIXELS, max_pixels: Any = MAX_PIXELS, mode: str = "vtu",
                 kernel: str = "sdpa", cache: str = "decode_fast", dtype: str = "auto",
                 device: Optional[str] = None, batch_size: int = 1, chat_template: Optional[str] = None,
                 download: Any = True, weights: str = "pretrained", vision_layers: Optional[int] = None,
                 stop_at_until: Any = False, max_batch_size: Optional[int] = None, **unknown: Any) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported: give a number (DyMU's batches are padded to their "
                             "longest compact prompt)")
        if unknown:
            raise ValueError(f"unknown model argument(s) {', '.join(sorted(unknown))} for {type(self).__name__}")
        if weights not in ("pretrained", "random"):
            raise ValueError(f"weights must be 'pretrained' or 'random', got {weights!r}")
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        family = family_named(self.family)
        self.stop_at_until = _flag("stop_at_until", stop_at_until)
        setting = parse_setting(self.family, thresholds, tome, pool, random, seed)
        self.accelerator = Accelerator()
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        device = device if self._world_size == 1 and device else str(self.accelerator.device)
        source = pretrained or family.default_pretrained
        try:
            loaded = vlm.load_vlm(source, "random" if weights == "random" else "pretrained", device,
                                  None if dtype == "auto" else DTYPES[dtype],
                                  allow_download=_flag("download", download),
                                  vision_layers=None if vision_layers is None else int(vision_layers))
        except (FileNotFoundError, ValueError) as err:  # say it in --model_args' own words
            raise type(err)(f"cannot load pretrained={source}: {err}. In --model_args: pretrained= takes a hub id "
                            "or a local model folder, download=true|false allows fetching a hub id (default true), "
                            "weights=random builds the hub id's classes at random") from None
        if type(loaded.model).__name__ not in family.classes:
            raise ValueError(f"{source} is a {type(loaded.model).__name__}; --model {self.model_name()} runs "
                             f"{', '.join(family.classes)}")
        self.model, self.processor, self.tokenizer = loaded.model, loaded.processor, loaded.processor.tokenizer
        self.pictures = HarnessProcessor(self.model, self.processor, int(min_pixels), int(max_pixels))
        self.tokenizer.padding_side = "left"
        self.batch_size_per_gpu, self.chat_template, self.reduction = int(batch_size), chat_template, setting
        self.setting = {"thresholds": thresholds, "tome": tome, "pool": pool, "random": random, "seed": seed,
                        "metric": metric, "window": window, "temporal": temporal, "mode": mode}
        vlm.patch_vlm(self.model, setting, mode=mode, kernel=kernel, cache=cache, metric=metric,
                      window=None if window is None else int(window), temporal=None if temporal is None else float(temporal))
        self.records: list[dict[str, Any]] = []
        logger.info(f"{self.model_name()}: {loaded.weights}; {mode} mode, {setting!r}")

    @classmethod
    def model_name(cls) -> str:
        return family_named(cls.family).lmms_name

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _inputs(self, contexts: list[str], visuals: list[list[Any]]) -> dict[str, Any]:
        """Prompts and pictures as the family's own lmms-eval model builds them (its system turn,
        pictures and processor options: ``VLMFamily.lmms_*``), batched."""
        family = family_named(self.family)
        prompts = [build_prompt(self.processor, c, len(v), self.chat_template, family.placeholder("image"),
                                family.lmms_system_prompt) for c, v in zip(contexts, visuals)]
        inputs = self.pictures(images=images_per_prompt(visuals), text=prompts, return_tensors="pt", padding=True)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def _check_fits(self, visuals: list[list[Any]]) -> None:
        """A pooling grid or a random keep that some sample's picture cannot take (Qwen's grids
        follow the picture) fails before any answer, naming the sample, not hours into a run."""
        if not isinstance(self.reduction, (Pool, RandomPrune)):
            return
        family = family_named(self.family)
        for i, pictures in enumerate(visuals):
            pictures = [p for p in pictures if not isinstance(p, str)]  # video paths are refused later
            for grid in family.baseline_grids(self.model, self.pictures, pictures) if pictures else []:
                try:
                    check_reduction(self.reduction, grid)
                except ValueError as err:
                    raise ValueError(f"sample {i}: {err}; match the baseline on the task's own pictures "
                                     "(vlm.baselines.match_budget through dymu_viz.eval.HarnessProcessor)") from None

    @_failing_the_run
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        self._check_fits([list(to_visual(self.task_dict[t][s][d]) or []) for _, _, to_visual, d, t, s in
                          (r.args for r in requests)])
        collator = lmms_utils.Collator([r.args for r in requests], lambda a: (-len(self.tokenizer.encode(a[0])), a[0]),
                                       grouping=True)
        results: list[GenerationResult] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.model_name()} answering")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            visuals = [list(to_visual(self.task_dict[t][s][d]) or [])  # a batch may mix tasks with equal kwargs
                       for to_visual, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            if any(isinstance(v, str) for vs in visuals for v in vs):
                raise ValueError(f"{self.model_name()} evaluates image tasks; {tasks[0]} gives video paths (videos "
                                 "run through dymu_viz.vlm directly, not through this harness yet)")
            results += self._generate(list(contexts), visuals, dict(all_kwargs[0]))
            bar.update(len(chunk))
        bar.close()
        results = collator.get_original(results)
        # lmms-eval pads the last ranks with copies of a request: they are not samples
        self.records = [r.token_counts.dymu for r, q in zip(results, requests)
                        if not (q.metadata or {}).get("__padding_only__")]
        self._report()
        return results

    def _generate(self, contexts: list[str], visuals: list[list[Any]], kwargs: dict[str, Any]) -> list[GenerationResult]:
        until = kwargs.pop("until", None) if self.stop_at_until else None
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(kwargs.get("temperature", 0) or 0)
        max_new_tokens = int(kwargs.get("max_new_tokens", family_named(self.family).lmms_max_new_tokens))
        generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                               num_beams=int(kwargs.get("num_beams", 1)), pad_token_id=self.tokenizer.eos_token_id,
                               eos_token_id=self.tokenizer.eos_token_id)
        if temperature > 0:
            generate_kwargs.update(temperature=temperature, top_p=kwargs.get("top_p"))
        inputs = self._inputs(contexts, visuals)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        with forward_times(self.model) as times:
            out = vlm.generate(self.model, **inputs, **generate_kwargs)
        peak_mib = torch.cuda.max_memory_allocated(self.device) / 2 ** 20 if cuda else None  # None: no CPU figure
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        stages = times.stages()
        cfg = self.model.config.get_text_config()
        vision = tower_crop_flops(self.model)  # per crop; with beams each sample's crops come once per beam
        family, first = family_named(self.family), 0  # first: the row's first image in the batch
        beams, stop = generate_kwargs["num_beams"], self.tokenizer.eos_token_id
        results = []
        for row, (acc, text) in enumerate(zip(out.accounting, texts)):
            new = out.sequences[row].tolist()
            output_tokens = new.index(stop) if stop in new else len(new)
            own = output_tokens + (stop in new)  # tokens this sample generated, its EOS included
            crops, vision = vision[:len(acc["crop_tokens"])], vision[len(acc["crop_tokens"]) * beams:]
            # the cache entries of its own tokens (not the padding steps after it finished; the last token is not cached)
            entries = acc["llm_compact_length"] + own - 1
            tower = sum(crops) if crops else family.vision_flops(
                self.model, family.item_inputs(inputs, first, len(visuals[row])), acc)
            first += len(visuals[row])
            record = {**acc, **self.setting, "images": len(visuals[row]), "output_tokens": output_tokens,
                      "generated_tokens": own,
                      "kv_cache_entries": entries, "kv_key_entries": acc["kv_key_entries"] - acc["kv_cache_entries"] + entries,
                      "batch_size": len(contexts), "num_beams": beams,
                      **{f"batch_{key}": value for key, value in stages.items()}, "batch_peak_mib": peak_mib,
                      "vision_flops": tower,
                      "prefill_flops": llm_prefill_flops(cfg, acc["llm_compact_length"], acc["llm_virtual_length"], 1),
                      "decode_flops": llm_decode_flops(cfg, max(own - 1, 0), acc["llm_virtual_length"])}
            results.append(GenerationResult(cut_at_stop(text, until),
                                            DyMUTokenCounts(acc["llm_compact_length"], output_tokens, record)))
        return results

    def _report(self) -> None:
        """Log the summary of every sample so far (all processes) into lmms-eval's throughput
        metrics, which the results JSON keeps, and print it."""
        records = gather_object(self.records) if self._world_size > 1 else self.records
        if not records or self.rank != 0:
            return
        summary = summarize(records)
        elapsed = sum(r[f"batch_{s}_s"] / r["batch_size"] for r in records for s in ("vision", "prefill", "decode"))
        generated = sum(r["output_tokens"] for r in records)
        log_metrics(elapsed, generated, generated / elapsed if elapsed else 0.0,
                    {**flat_summary(summary), "dymu_samples": len(records)})
        print(f"DyMU accounting over {len(records)} samples ({self.setting}):\n{summary_table(summary)}", flush=True)

    @_failing_the_run
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Log-probability of each continuation after its prompt, and whether greedy decoding
        would give it (one request at a time)."""
        results = []
        for context, continuation, doc_to_visual, doc_id, task, split in tqdm(
                [r.args for r in requests], disable=self.rank != 0, desc=f"{self.model_name()} scoring"):
            continuation = continuation if isinstance(continuation, str) else \
                continuation(self.task_dict[task][split][doc_id])
            visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
            inputs = self._inputs([context], [visuals])
            prompt = inputs.pop("input_ids")
            # the continuation tokenized on its own, so that no token straddles the boundary
            target = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
            ids = torch.cat([prompt, target[None].to(prompt.device)], 1)
            for key, value in inputs.items():  # per-token fields (token types: 0 is text) cover the continuation
                if torch.is_tensor(value) and value.shape == prompt.shape:
                    inputs[key] = torch.cat([value, value.new_zeros((1, len(target)))], 1)
            inputs["attention_mask"] = torch.ones_like(ids)
            logits, _ = vlm.logits(self.model, ids, **inputs)
            start = prompt.shape[1]
            logprobs = torch.log_softmax(logits[0, start - 1:-1].float(), dim=-1)
            target = target.to(logprobs.device)
            results.append((float(logprobs.gather(1, target[:, None]).sum()),
                            bool((logprobs.argmax(-1) == target).all())))
        return results

    @_failing_the_run
    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{self.model_name()} answers single-round tasks only (generate_until, loglikelihood)")

    @_failing_the_run
    def generate_visual_cot(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{self.model_name()} answers single-round tasks only (generate_until, loglikelihood)")


def _family_models() -> dict[str, type]:
    """One ``DyMUModel`` subclass per family with an lmms-eval name, named by the family
    (``VLMFamily.lmms_class``) and importable from this module, as lmms-eval's registry needs."""
    classes = {}
    for family in FAMILIES.values():
        if family.lmms_name:
            classes[family.lmms_class] = type(family.lmms_class, (DyMUModel,), {
                "family": family.name, "__module__": __name__,
                "__doc__": f"``--model {family.lmms_name}``: HF {family.title} with DyMU."})
    return classes


globals().update(_family_models())
