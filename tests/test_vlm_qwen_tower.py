"""DToMe inside the Qwen-VL ViT (``dymu_viz.vlm.unit_tower``): whole 2 x 2 units merge, the
attention runs on the virtual (vanilla) layout. Tiny random models of the exact classes.

The defining property is checked block by block in float64: a patched block's output, at every
patch, is the vanilla block's (HF's own forward) on the virtually unmerged input with its
attention's copies averaged back, then averaged over the units the block merged. A tower that
never merges but runs the compact path is vanilla; generation, caching, batching, videos, the
thresholds file and the accounting follow from it.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from dymu_viz import Thresholds, classswap, vlm
from dymu_viz.vlm import unit_tower
from test_vlm_qwen import batch, photos, vanilla, video_batch
from tiny_models import VLM_QUESTIONS, check_causal_and_cached_decode, tiny_qwen, tiny_qwen3, tiny_vlm

VERSIONS = ["2", "2.5", "3"]
pytestmark = pytest.mark.usefixtures("no_grad")


def tiny(version: str, dtype: torch.dtype = torch.float32):
    return tiny_qwen3(dtype=dtype) if version == "3" else tiny_qwen(version, dtype=dtype)


def tower_inputs(processor) -> dict:
    """Three pictures of different sizes and aspects (a flat one and two photos)."""
    return dict(processor.image_processor(images=photos(3), return_tensors="pt"))


def patch_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each unit's compact row (U,) -> each patch's compact patch row (4U,)."""
    return (4 * rows[:, None] + torch.arange(4)).flatten()


def virtual(x: torch.Tensor, rows) -> torch.Tensor:
    """Compact patch rows -> every patch's copy in the tower's order (rows None: x already is)."""
    return x if rows is None else x[patch_rows(rows)]


def group_mean(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the mean of the rows sharing its id."""
    sums = torch.zeros(int(ids.max()) + 1, x.shape[1], dtype=x.dtype).index_add_(0, ids, x)
    return (sums / torch.bincount(ids)[:, None].to(x.dtype))[ids]


def record_blocks(visual) -> tuple[list[dict], list]:
    """Hooks that keep, per block of a patched tower pass: its input, keyword arguments and output,
    and each unit's compact row (tower order) before and after it (None: not compact yet)."""
    records: list[dict] = []

    def rows_now():
        run = unit_tower.plan_of(visual).run
        return run.rows.clone() if run is not None and run.compact else None

    def before(block, args, kwargs):
        records.append({"block": block, "x": args[0].clone(), "rows_in": rows_now(), "kwargs": dict(kwargs)})

    def after(block, args, kwargs, out):
        records[-1].update(out=out.clone(), rows_out=rows_now())

    hooks = [h for b in visual.blocks for h in (b.register_forward_pre_hook(before, with_kwargs=True),
                                                b.register_forward_hook(after, with_kwargs=True))]
    return records, hooks


def reference_block(record: dict, units: int) -> torch.Tensor:
    """HF's own block forward on the virtually unmerged input, its attention output averaged over
    the copies of each compact row, then the output averaged over the rows after the block."""
    block = record["block"]
    before = torch.arange(units) if record["rows_in"] is None else record["rows_in"]
    hook = block.attn.register_forward_hook(lambda m, a, out: group_mean(out, patch_rows(before)))
    try:
        out = classswap.base_class(block).forward(block, virtual(record["x"], record["rows_in"]), **record["kwargs"])
    finally:
        hook.remove()
    return group_mean(out, patch_rows(record["rows_out"])) if record["rows_out"] is not None else out


@pytest.mark.floor
@pytest.mark.parametrize("version", VERSIONS)
def test_a_tower_that_never_merges_is_vanilla_on_the_compact_path(version: str) -> None:
    """Thresholds above any cosine (2.0) run every block compact, on the virtual layout: the
    tower's output equals HF's (fp32 1e-5); infinite ones leave the tower unpatched."""
    model, processor = tiny(version)
    visual = model.model.visual
    inputs = tower_inputs(processor)
    ref = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    unit_tower.install(visual, [2.0] * len(visual.blocks))
    out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert unit_tower.plan_of(visual).last.rows is not None  # the compact path ran
    assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-5
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= 1e-5
    for a, b in zip(getattr(out, "deepstack_features", None) or [], getattr(ref, "deepstack_features", None) or []):
        assert (a - b).abs().max() <= 1e-5
    vlm.patch_vlm(model, None, tower=[float("inf")] * len(visual.blocks))
    assert unit_tower.plan_of(visual) is None and not classswap.is_swapped(visual, "unit_tower")


@pytest.mark.parametrize("version", VERSIONS)
def test_generate_with_a_never_merging_tower_equals_vanilla_with_images_video_and_beams(version: str) -> None:
    model, processor = tiny(version)
    depth = len(model.model.visual.blocks)
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=3, num_return_sequences=2)
    for inputs in (batch(processor, (2, 1), VLM_QUESTIONS[:2]), video_batch(processor)):
        valid = inputs["attention_mask"].bool()
        ref = vanilla(model, inputs).logits
        greedy, beam = (model.generate(**inputs, max_new_tokens=4, do_sample=False), model.generate(**inputs, **beams))
        vlm.patch_vlm(model, None, tower=[2.0] * depth)
        assert (model(**inputs).logits - ref)[valid].abs().max() <= 1e-5
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), greedy)
        assert torch.equal(model.generate(**inputs, **beams), beam)
        vlm.unpatch_vlm(model)


@pytest.mark.floor
@pytest.mark.exact_counts
@pytest.mark.parametrize("version", VERSIONS)
def test_every_block_is_the_vanilla_block_on_the_virtual_input_then_the_group_mean(version: str) -> None:
    """float64, merges in two blocks (the second after the first merged). On Qwen2.5-VL some
    merged token spans two attention windows (112 px = 4 x 4 units), which only the virtual
    layout can run exactly."""
    model, processor = tiny(version, torch.float64)
    visual = model.model.visual
    inputs = tower_inputs(processor)
    unit_tower.install(visual, [0.2, None, 0.0, None])
    records, hooks = record_blocks(visual)
    try:
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        for hook in hooks:
            hook.remove()
    units = len(unit_tower.window_raster(visual, inputs["image_grid_thw"]))
    counts = unit_tower.plan_of(visual).last.counts
    assert sum(counts[0]) < units and sum(counts[2]) < sum(counts[1])  # both blocks merged
    for k, record in enumerate(records):
        ours = virtual(record["out"], record["rows_out"])
        assert (ours - reference_block(record, units)).abs().max() <= 1e-10, k
    if version == "2.5":
        raster = unit_tower.window_raster(visual, inputs["image_grid_thw"])
        rows = records[-1]["rows_out"][raster.argsort()]  # raster order, images one after another
        windows = torch.cat([(torch.arange(h // 2 * (w // 2)) // (w // 2) // 4) * 100 + torch.arange(w // 2).repeat(h // 2) // 4
                             + 10_000 * i for i, (_, h, w) in enumerate(inputs["image_grid_thw"].tolist())])
        spans = [len(set(windows[rows == r].tolist())) for r in rows.unique()]
        assert max(spans) > 1
    assert out.pooler_output.shape[0] == units  # one row per unit, as vanilla


@pytest.mark.parametrize("version", VERSIONS)
def test_the_merger_receives_whole_units(version: str) -> None:
    """Each unit's output is HF's merger of that unit's own four patch rows, in slot order: the
    merger's input holds four rows per compact unit, and applied to the virtual last hidden
    state it gives every unit's row of the output."""
    model, processor = tiny(version, torch.float64)
    visual = model.model.visual
    inputs = tower_inputs(processor)
    unit_tower.install(visual, [0.0, 0.0, None, None])
    seen = []
    hook = visual.merger.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        hook.remove()
    last = unit_tower.plan_of(visual).last
    assert seen == [4 * sum(last.counts[-1])]
    merger = classswap.base_class(visual.merger).forward(visual.merger, out.last_hidden_state)
    raster = unit_tower.window_raster(visual, inputs["image_grid_thw"])
    assert (merger[raster.argsort()] - out.pooler_output).abs().max() <= 1e-12
    assert len(last.rows.unique()) == sum(last.counts[-1])


@pytest.mark.exact_counts
@pytest.mark.parametrize("version", ["2.5", "3"])
def test_in_tower_merging_is_batch_invariant_on_photos(version: str) -> None:
    """Each photo alone and in a batch of three sizes: the same tokens after every block, the
    same groups, the same features (float64)."""
    model, processor = tiny(version, torch.float64)
    visual = model.model.visual
    unit_tower.install(visual, [0.3, None, 0.1, None])
    pictures = photos(4)[1:]
    together = processor.image_processor(images=pictures, return_tensors="pt")
    out = visual(together["pixel_values"], grid_thw=together["image_grid_thw"]).pooler_output
    record = unit_tower.plan_of(visual).last
    units = (together["image_grid_thw"].prod(-1) // 4).tolist()
    for i, (picture, part, rows) in enumerate(zip(pictures, out.split(units), record.split(units))):
        alone = processor.image_processor(images=[picture], return_tensors="pt")
        single = visual(alone["pixel_values"], grid_thw=alone["image_grid_thw"]).pooler_output
        mine = unit_tower.plan_of(visual).last
        assert [c[0] for c in mine.counts] == [c[i] for c in record.counts]
        assert torch.equal(mine.rows, rows)
        assert (single - part).abs().max() <= 1e-10


@pytest.mark.floor
@pytest.mark.parametrize("version", VERSIONS)
def test_cached_decode_equals_recomputation_with_merging_in_the_tower(version: str) -> None:
    model, processor = tiny(version)
    vlm.patch_vlm(model, [0.5, 0.5], tower=[0.4, None, 0.2, None])
    check_causal_and_cached_decode(model, batch(processor))


@pytest.mark.parametrize("version", VERSIONS)
def test_generate_accounts_the_tower_tokens_of_every_block(version: str) -> None:
    """model.generate (greedy and beams) runs; per prompt, tower_tokens holds each image's tokens
    after every block (never rising), its last entry the tower's output (encoder_tokens); the
    rounds then keep fewer, and the virtual length stays every unit."""
    model, processor = tiny(version)
    inputs = batch(processor)
    units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    vlm.patch_vlm(model, [0.5, 0.5], tower=[0.4, None, 0.2, None])
    model.generate(**inputs, max_new_tokens=3, do_sample=False, num_beams=2)
    greedy = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert greedy.shape[0] == 3
    for acc, n in zip(model.dymu_vlm.last, units):
        (tower,) = acc["tower_tokens"]
        assert len(tower) == 5 and tower[0] == n and all(a >= b for a, b in zip(tower, tower[1:])) and tower[1] < n
        assert acc["encoder_tokens"] == tower[-1] and acc["image_tokens"] <= tower[-1]
        assert acc["image_positions"] == n
    from dymu_viz import viz

    assert viz.tower_count_matrix(model.dymu_vlm.last).tolist() == [a["tower_tokens"][0] for a in model.dymu_vlm.last]
    ax = viz.plot_tower_counts(model.dymu_vlm.last)
    assert len(ax.lines) == 3 + 1 and list(ax.lines[-1].get_xdata()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_video_time_steps_merge_on_their_own_inside_the_tower(version: str) -> None:
    """The tower's attention never crosses a video's time steps, and neither do its merges: a
    still video's identical steps keep equal counts, and no token spans two steps."""
    model, processor = tiny(version)
    inputs = video_batch(processor)
    vlm.patch_vlm(model, None, tower=[0.0, None, 0.0, None])
    moving, still = vlm.qwen.qwen_images(model, inputs["pixel_values_videos"], inputs["video_grid_thw"], None,
                                         video=True)
    for tokens, (t, h, w) in zip((moving, still), inputs["video_grid_thw"].tolist()):
        rows = [set(step.tolist()) for step in tokens.mapping.view(t, -1)]
        assert all(not (rows[i] & rows[j]) for i in range(t) for j in range(i))
        assert len(tokens.features) < t * h * w // 4
    assert len(set(len(r) for r in (set(s.tolist()) for s in still.mapping.view(3, -1)))) == 1


def test_the_thresholds_file_carries_the_tower_and_patch_vlm_follows_it(tmp_path) -> None:
    """metadata["tower"] = {"values", "r"} (r = 0: the block never merges), saved and loaded,
    patches the tower as tower= does."""
    model, processor = tiny_qwen("2.5")
    inputs = batch(processor)
    tower = {"values": [0.4, 0.9, 0.2, 0.9], "r": [1, 0, 1, 0]}
    saved = Thresholds([0.5, 0.5], [1, 1], model="Qwen2_5_VLForConditionalGeneration",
                       metadata={"kind": vlm.qwen.ROUNDS_KIND, "tower": tower})
    saved.save(tmp_path / "t.json")
    vlm.patch_vlm(model, Thresholds.load(tmp_path / "t.json"))
    assert unit_tower.plan_of(model.model.visual).thresholds == [0.4, None, 0.2, None]
    from_file = model(**inputs).logits
    vlm.patch_vlm(model, [0.5, 0.5], tower=[0.4, None, 0.2, None])
    assert torch.equal(model(**inputs).logits, from_file)
    vlm.patch_vlm(model, [0.5, 0.5])  # plain rounds: the tower is HF's again
    assert unit_tower.plan_of(model.model.visual) is None
    assert not any(classswap.is_swapped(m, k) for m in model.model.visual.modules() for k in ("unit_block", "unit_qkv"))


def test_a_pickled_model_keeps_its_tower_plan() -> None:
    model, processor = tiny_qwen("2.5")
    inputs = batch(processor)
    vlm.patch_vlm(model, [0.5], tower=[0.4, None, 0.2, None])
    ref = model(**inputs).logits
    copy = pickle.loads(pickle.dumps(model))
    assert unit_tower.plan_of(copy.model.visual).thresholds == [0.4, None, 0.2, None]
    assert torch.equal(copy(**inputs).logits, ref)
    vlm.unpatch_vlm(copy)
    assert unit_tower.plan_of(copy.model.visual) is None and type(copy.model.visual.blocks[0].attn.qkv) is torch.nn.Linear


def test_clear_errors_for_tower_thresholds() -> None:
    model, processor = tiny_qwen("2.5")
    with pytest.raises(ValueError, match="4 blocks"):
        vlm.patch_vlm(model, [0.5], tower=[0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        vlm.patch_vlm(model, [0.5], tower=[float("nan"), None, None, None])
    with pytest.raises(ValueError, match="one threshold per ViT block"):
        vlm.patch_vlm(model, [0.5], tower=0.5)
    with pytest.raises(ValueError, match="window= does not apply"):
        vlm.patch_vlm(model, [0.5], tower=[0.5, None, None, None], window=4)
    with pytest.raises(ValueError, match="tower thresholds do not apply"):
        vlm.patch_vlm(model, vlm.baselines.ToMe([4]), tower=[0.5, None, None, None])
    llava, _ = tiny_vlm("llava")
    with pytest.raises(ValueError, match="tower"):
        vlm.patch_vlm(llava, None, tower=[0.5])


def kept_shares(model, processor, images) -> tuple[float, float]:
    """(share of units leaving the tower, share reaching the LLM) over ``images`` as one batch."""
    pixels = processor.image_processor(images=images, return_tensors="pt")
    tokens = vlm.qwen.qwen_images(model, pixels["pixel_values"], pixels["image_grid_thw"],
                                  model.dymu_vlm.unit_thresholds)
    units = sum(len(t.mapping) for t in tokens)
    return sum(t.crop_tokens[0] for t in tokens) / units, sum(len(t.features) for t in tokens) / units


def test_tower_calibration_keeps_the_asked_shares_and_patch_vlm_follows_it(tmp_path) -> None:
    """One batch: the tower keeps tower_keep of the units at its output and the rounds take them on
    to keep, as the batch rule itself does; only the named blocks merge; the saved file patches
    the model with both."""
    from dymu_viz.vlm.qwen import calibrate_rounds

    model, processor = tiny_qwen("2.5")
    images = photos(4)
    thresholds = calibrate_rounds(model, processor, images, keep=0.2, rounds=2, batch_size=4, progress=False,
                                  tower_keep=0.5, tower_blocks=[1, 2], out=tmp_path / "t.json")
    tower = thresholds.metadata["tower"]
    assert tower["r"] == [0, 1, 1, 0] and tower["values"][0] is None and tower["values"][3] is None
    assert tower["keep"] == 0.5 and thresholds.layers == 2
    assert unit_tower.plan_of(model.model.visual) is None  # calibration leaves the tower as it found it
    assert not list(tmp_path.glob("t.json.partial*"))  # checkpoints go once the result is saved
    vlm.patch_vlm(model, Thresholds.load(tmp_path / "t.json"))
    assert unit_tower.plan_of(model.model.visual).thresholds == [None, *tower["values"][1:3], None]
    after_tower, after_rounds = kept_shares(model, processor, images)
    assert abs(after_tower - 0.5) < 0.02 and abs(after_rounds - 0.2) < 0.02, (after_tower, after_rounds)
    with pytest.raises(ValueError, match="tower_blocks needs tower_keep"):
        calibrate_rounds(model, processor, images, tower_blocks=[1])
    with pytest.raises(ValueError, match="at most tower_keep"):
        calibrate_rounds(model, processor, images, keep=0.6, tower_keep=0.5)
    with pytest.raises(ValueError, match="tower_keep must be between"):
        calibrate_rounds(model, processor, images, keep=0.1, tower_keep=0.2, tower_blocks=[3])
    with pytest.raises(ValueError, match="blocks of the 4-block tower"):
        calibrate_rounds(model, processor, images, keep=0.4, tower_keep=0.5, tower_blocks=[4])


def test_an_interrupted_tower_calibration_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch) -> None:
    """Killed after its second batch (checkpoints every batch), resumed: the same thresholds as
    one uninterrupted run."""
    from dymu_viz.vlm.families import qwen2_vl
    from dymu_viz.vlm.qwen import calibrate_rounds

    model, processor = tiny_qwen("2.5")
    paths = []
    for k, photo in enumerate(photos(4) * 2):
        paths.append(tmp_path / f"{k}.png")
        photo.convert("RGB").resize((84 + 28 * (k % 3), 112)).save(paths[-1])
    run = dict(keep=0.25, rounds=2, batch_size=2, progress=False, tower_keep=0.5, checkpoint_every=1)
    whole = calibrate_rounds(model, processor, paths, **run, out=tmp_path / "whole.json")
    loads, load = [0], qwen2_vl.load_rgb

    def dies_on_the_fifth(path):
        loads[0] += 1
        if loads[0] == 5:
            raise KeyboardInterrupt
        return load(path)

    monkeypatch.setattr(qwen2_vl, "load_rgb", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        calibrate_rounds(model, processor, paths, **run, out=tmp_path / "cut.json")
    assert len(list(tmp_path.glob("cut.json.partial*"))) == 1
    loaded = []
    monkeypatch.setattr(qwen2_vl, "load_rgb", lambda path: loaded.append(path) or load(path))
    resumed = calibrate_rounds(model, processor, paths, **run, out=tmp_path / "cut.json", resume=True)
    assert loaded == paths[4:]  # only the batches not finished before
    assert resumed.values == whole.values and resumed.metadata["tower"] == whole.metadata["tower"]
    assert resumed.metadata["n_images"] == 8 and resumed.r == whole.r


def test_tower_calibration_under_torchrun_equals_one_process(tmp_path) -> None:
    from test_vlm_qwen import calibrate_rounds_cli

    one, _, _, _ = calibrate_rounds_cli(tmp_path, ["--vision-layers", "2", "--keep", "0.3", "--rounds", "1",
                                                   "--batch-size", "1", "--tower-keep", "0.6"], 29537)
    assert "tower     : block 0" in one.stdout
    a, b = (Thresholds.load(tmp_path / f"{n}.json") for n in ("one", "two"))
    assert a.values == b.values and a.metadata["tower"] == b.metadata["tower"]
    assert a.metadata["tower"]["r"] == [1, 1] and a.metadata["processes"] == 1 and b.metadata["processes"] == 2


@pytest.mark.parametrize("version", VERSIONS)
def test_tower_flops_count_what_the_tower_runs(version: str) -> None:
    """``qwen_tower_flops`` against torch's own FLOP counter on the tower's ops (eager
    attention, so its matmuls are counted): the patch embedding (convolution), the blocks' linear
    layers and the mergers (addmm) exactly, vanilla and merging in the tower; attention exactly
    on the vanilla segments (frames, Qwen2.5-VL's windows), which the virtual layout keeps."""
    from torch.utils.flop_counter import FlopCounterMode

    from dymu_viz.vlm.families.qwen_tower import qwen_tower_flops

    model, processor = tiny(version)
    visual = model.model.visual
    visual.config._attn_implementation = "eager"
    inputs = tower_inputs(processor)
    grids = inputs["image_grid_thw"].tolist()
    for thresholds in (None, [0.2, None, 0.0, None]):
        if thresholds is not None:
            unit_tower.install(visual, thresholds)
        with FlopCounterMode(display=False) as counter:
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        tokens = [sum(c) for c in unit_tower.plan_of(visual).last.counts] if thresholds else None
        ours = qwen_tower_flops(visual, grids, tokens)
        assert counted["aten.convolution"] == ours["embed"]
        assert counted["aten.addmm"] == ours["linear"] + ours["mergers"]
        if thresholds is None:
            assert counted["aten.bmm"] == ours["attention"]
        else:
            assert tokens[-1] < sum(g[1] * g[2] // 4 for g in grids) and counted["aten.addmm"] > 0


def test_stage_costs_count_the_qwen_tower_from_the_accounting() -> None:
    from dymu_viz.vlm.costs import stage_costs
    from dymu_viz.vlm.families.qwen_tower import qwen_tower_flops

    model, processor = tiny_qwen("2.5")
    inputs = batch(processor, (1,), VLM_QUESTIONS[:1])
    grids = inputs["image_grid_thw"].tolist()
    vlm.patch_vlm(model, None, mode="full")
    full = stage_costs(model, inputs, new_tokens=2, warmup=0, reps=1)
    assert full["vision_flops"] == qwen_tower_flops(model.model.visual, grids)["total"]
    vlm.patch_vlm(model, [0.5], tower=[0.2, None, 0.0, None])
    merged = stage_costs(model, inputs, new_tokens=2, warmup=0, reps=1)
    (tower,) = model.dymu_vlm.last[0]["tower_tokens"]
    assert merged["vision_flops"] == qwen_tower_flops(model.model.visual, grids, tower[1:])["total"] < full["vision_flops"]


def test_tower_merge_maps_nest_block_by_block_and_plot() -> None:
    """The per-block maps: one for every block that merged, the last one the tower's groups, each
    group of an earlier block inside one group of a later block; drawn as a row per image."""
    from dymu_viz import viz

    model, processor = tiny_qwen("2.5")
    visual = model.model.visual
    inputs = tower_inputs(processor)
    unit_tower.install(visual, [0.3, None, 0.1, None])
    visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    last = unit_tower.plan_of(visual).last
    units = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    maps = last.item_maps(units)
    for per_block, final in zip(maps, last.split(units)):
        assert sorted(per_block) == [0, 2] and torch.equal(per_block[2], final)
        early, late = per_block[0], per_block[2]
        assert all(len(late[early == row].unique()) == 1 for row in early.unique())
        assert len(early.unique()) > len(late.unique())
    fig = viz.plot_tower_merge_maps(photos(3), maps, inputs["image_grid_thw"])
    assert len(fig.axes) == 9
    assert fig.axes[2].get_title() == f"after block 2: {len(maps[0][2].unique())} tokens"


def test_the_temporal_calibration_runs_after_the_tower_its_rounds_were_found_with() -> None:
    """calibrate_temporal on thresholds that record a tower merges inside it as patch_vlm will
    (so the share it asks for holds there), and leaves the model's tower as it was."""
    import numpy as np

    model, processor = tiny_qwen("2.5")
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (4, 56, 84, 3), dtype=np.uint8),
              np.repeat(rng.integers(0, 255, (1, 84, 112, 3), dtype=np.uint8), 6, 0)]
    rounds = Thresholds([0.5], [1], metadata={"kind": vlm.qwen.ROUNDS_KIND,
                                              "tower": {"values": [0.0, None, None, None], "r": [1, 0, 0, 0]}})
    with_time = vlm.qwen.calibrate_temporal(model, processor, videos, rounds, keep=0.6, progress=False)
    assert unit_tower.plan_of(model.model.visual) is None
    assert with_time.metadata["tower"] == rounds.metadata["tower"]
    vlm.patch_vlm(model, with_time)
    clips = processor.video_processor(videos=videos, return_tensors="pt")
    counts = [sum(len(t.features) for t in vlm.qwen.qwen_images(
        model, clips["pixel_values_videos"], clips["video_grid_thw"], [0.5], video=True, temporal=temporal))
        for temporal in (None, with_time.metadata["temporal"])]
    assert unit_tower.plan_of(model.model.visual).last.rows is not None  # the tower merged
    assert counts[1] <= 0.6 * counts[0] + 1, counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tower_merging_is_finite_and_close_to_fp32(dtype: torch.dtype) -> None:
    """The same images in half precision: finite logits, and the tower's tokens within a few of
    fp32's (a merge is a strict score > threshold, which rounding can flip near it)."""
    inputs = batch(tiny_qwen("2.5")[1])
    counts = {}
    for d in (torch.float32, dtype):
        model, _ = tiny_qwen("2.5", dtype=d)
        vlm.patch_vlm(model, [0.5], tower=[0.4, None, 0.2, None])
        out = model(**{k: v.to(d) if v.is_floating_point() else v for k, v in inputs.items()}).logits
        assert torch.isfinite(out).all()
        counts[d] = [a["encoder_tokens"] for a in model.dymu_vlm.last]
    assert all(abs(a - b) <= 3 for a, b in zip(counts[torch.float32], counts[dtype])), counts


def test_compact_mode_with_tower_merging_puts_each_token_at_its_first_unit() -> None:
    model, processor = tiny_qwen("2.5")
    inputs = batch(processor)
    vlm.patch_vlm(model, [0.5], tower=[0.4, None, 0.2, None], mode="compact")
    check_causal_and_cached_decode(model, inputs)
    acc = model.dymu_vlm.last
    assert all(a["llm_virtual_length"] == a["llm_compact_length"] for a in acc)
    assert all(a["image_tokens"] <= a["encoder_tokens"] < a["image_positions"] for a in acc)


@pytest.mark.parametrize("version", ["2.5", "3"])
def test_second_chat_turn_on_the_kept_cache_equals_recomputation_with_merging_in_the_tower(version: str) -> None:
    """The user's path: generate on the processor's output (two prompts, nested images), then a
    second turn on the kept cache; it equals recomputing the whole conversation (fp64, 1e-8)."""
    from test_family_contract import CASES, check_text_turn_on_the_kept_cache, inputs_of

    model, processor = tiny(version, torch.float64)
    inputs = inputs_of(processor, model, (1, 1), nested=True)
    vlm.patch_vlm(model, [0.0] * 2, tower=[0.3, None, 0.1, None])
    model(**inputs)
    assert all(a["tower_tokens"][0][-1] < a["tower_tokens"][0][0] for a in model.dymu_vlm.last)  # the tower merges
    check_text_turn_on_the_kept_cache(model, processor, inputs, CASES["qwen2_5_vl"][3])
