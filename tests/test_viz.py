"""The pictures show what the results hold: borders exactly where neighbouring patch groups
differ, fills equal to the group means / sizes, and plotted numbers read back from the Axes
equal to the result's counts, the thresholds, and numpy's correlation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from matplotlib import colormaps

import dymu_viz
from dymu_viz import stats, viz
from tiny_models import make_hf_clip, make_open_clip

P = 8  # pixels per patch in the hand-made maps
GROUPS = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 2, 3],
                   [5, 2, 2, 3]])


def expected_borders(groups: np.ndarray, p: int) -> np.ndarray:
    """Borders computed patch by patch: the last pixel column (row) of a patch is a border
    over the patch's height (width) when the patch to its right (below) is another group."""
    gh, gw = groups.shape
    edge = np.zeros((gh * p, gw * p), dtype=bool)
    for i in range(gh):
        for j in range(gw):
            if j + 1 < gw and groups[i, j] != groups[i, j + 1]:
                edge[i * p:(i + 1) * p, (j + 1) * p - 1] = True
            if i + 1 < gh and groups[i, j] != groups[i + 1, j]:
                edge[(i + 1) * p - 1, j * p:(j + 1) * p] = True
    return edge


def assert_merge_map(out: np.ndarray, image: np.ndarray, groups: np.ndarray, p: int) -> None:
    """out is white exactly on the expected borders and elsewhere the mean colour of the
    pixels of the patch's group."""
    edge = expected_borders(groups, p)
    assert (out[edge] == 255).all()
    labels = np.kron(groups, np.ones((p, p), dtype=int))
    for g in np.unique(groups):
        mean = np.round(image[labels == g].astype(np.float64).mean(0)).astype(np.uint8)
        assert (out[(labels == g) & ~edge] == mean).all(), f"group {g} is not filled with its mean colour"


def test_merge_map_borders_lie_exactly_where_groups_change_and_fills_are_group_means() -> None:
    image = np.random.default_rng(0).integers(0, 200, (4 * P, 4 * P, 3), dtype=np.uint8)
    out = viz.merge_map(image, GROUPS)
    assert_merge_map(out, image, GROUPS, P)
    np.testing.assert_array_equal((out == 255).all(-1), expected_borders(GROUPS, P))  # the image never reaches 255


def test_size_map_colours_every_patch_by_its_group_size() -> None:
    out = viz.size_map(GROUPS, (4 * P, 4 * P))
    edge = expected_borders(GROUPS, P)
    np.testing.assert_array_equal((out == 255).all(-1), edge)
    sizes = {0: 4, 1: 4, 2: 5, 3: 2, 5: 1}
    labels = np.kron(GROUPS, np.ones((P, P), dtype=int))
    for g, size in sizes.items():
        colour = np.round(np.array(colormaps["viridis"](np.log(size) / np.log(16))[:3]) * 255)
        assert (out[(labels == g) & ~edge] == colour).all()
    np.testing.assert_array_equal(viz.group_sizes(GROUPS), np.vectorize(sizes.get)(GROUPS))


def test_bad_map_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="does not divide into the 4x4 patch grid"):
        viz.merge_map(np.zeros((30, 32, 3), np.uint8), GROUPS)
    with pytest.raises(ValueError, match=r"not the input of a 4x4 grid of 16x16-pixel patches \(64x64\)"):
        viz.render_map(np.zeros((400, 600, 3), np.uint8), GROUPS, patch=(16, 16))  # a raw photo, not the model input
    with pytest.raises(ValueError, match="unknown map style"):
        viz.render_map(np.zeros((32, 32, 3), np.uint8), GROUPS, "fancy")


@pytest.fixture(scope="module")
def encoded() -> tuple[list[np.ndarray], dymu_viz.EncoderResult, list[str]]:
    """Four photos through a tiny open_clip ViT (4 x 4 patches, 3 blocks) that merges."""
    torch.manual_seed(0)
    model = make_open_clip(layers=3, image=64, patch=16)
    photos = dymu_viz.sample_photos(["astronaut", "rocket", "coffee", "hubble_deep_field"])
    pixels = torch.stack([torch.tensor(np.asarray(p.resize((64, 64)))).permute(2, 0, 1).float() / 127.5 - 1
                          for p in photos.values()])
    dymu_viz.patch(model, 0.6)
    with torch.no_grad():
        result = dymu_viz.encode(model, pixels)
    assert len(set(result.counts[:, -1].tolist())) > 1 and (result.counts[:, -1] < 17).all()
    return viz.display_images(pixels), result, list(photos)


def test_merge_maps_show_each_layers_groups_and_counts(encoded) -> None:
    images, result, names = encoded
    layers = [1, -1]
    fig = viz.plot_merge_maps(images, result, names, layers=layers)
    axes = np.array(fig.axes).reshape(len(images), 1 + len(layers))
    for b, image in enumerate(images):
        np.testing.assert_array_equal(axes[b, 0].images[0].get_array(), image)
        assert axes[b, 0].get_title() == names[b]
        for j, layer in enumerate(layers, start=1):
            groups = result.patch_groups(layer)[b].numpy()
            shown = np.asarray(axes[b, j].images[0].get_array())
            assert_merge_map(shown, image, groups, 16)
            n = int(result.counts[b, layer])
            assert n == len(np.unique(groups)) + result.protected  # every token is a group (+ CLS)
            assert axes[b, j].get_title() == f"after layer {viz.layer_index(result, layer)}: {n} tokens ({n - 1} + CLS)"


def test_merge_maps_rows_pick_images_of_a_batch(encoded) -> None:
    images, result, names = encoded
    fig = viz.plot_merge_maps([images[2]], result, [names[2]], style="size", rows=[2])
    groups = result.patch_groups(-1)[2].numpy()
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), viz.size_map(groups, images[2].shape[:2]))


def dynamic_pad_timm() -> torch.nn.Module:
    """A tiny timm ViT that pads images which are not whole 16-px patches (dynamic_img_pad)."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, global_pool="token",
                             num_classes=0, dynamic_img_size=True, dynamic_img_pad=True).eval()


@pytest.mark.parametrize("family, size, grid", [("hf_clip", (60, 90), (4, 6)), ("timm_pad", (70, 70), (5, 5))])
def test_maps_of_inputs_that_are_not_whole_patches_draw_the_grid_the_model_saw(family, size, grid) -> None:
    """HF's interpolated positions floor (the conv never sees the last pixels), timm's dynamic
    padding pads: either way every patch is drawn patch_size pixels wide where it lies in the
    input, never stretched over the whole picture."""
    torch.manual_seed(0)
    model, kwargs = (make_hf_clip(), {"interpolate_pos_encoding": True}) if family == "hf_clip" else (dynamic_pad_timm(), {})
    pixels = torch.randn(1, 3, *size)
    dymu_viz.patch(model, 0.0)
    with torch.no_grad():
        result = dymu_viz.encode(model, pixels, **kwargs)
    (gh, gw), (p, _) = result.grid, result.patch_size
    assert result.grid == grid and result.patch_size == (p, p)
    groups = result.patch_groups()[0].numpy()
    assert len(np.unique(groups)) < gh * gw  # it merged
    shown = viz.display_images(pixels)[0]
    out = np.asarray(viz.plot_merge_maps([shown], result).axes[1].images[0].get_array())
    assert out.shape == (gh * p, gw * p, 3)
    seen = np.full_like(out, 128)  # what the patches cover: the input cropped, or padded grey
    h, w = min(size[0], gh * p), min(size[1], gw * p)
    seen[:h, :w] = shown[:h, :w]
    assert_merge_map(out, seen, groups, p)


def test_an_hf_processors_normalisation_is_undone_for_display(tmp_path) -> None:
    """HF weights come with an image processor, not a torchvision Normalize: its mean / std are
    read, so a flat colour is shown as itself (not min-max stretched to a colour cast)."""
    from types import SimpleNamespace

    from PIL import Image
    from transformers import CLIPImageProcessor

    make_hf_clip().save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(tmp_path)
    transform = dymu_viz.load_encoder(str(tmp_path)).preprocess  # as for a user's HF weights
    processor = transform.processor
    colour = (128, 64, 200)
    pixels = transform(Image.new("RGB", (300, 240), colour))[None]
    assert pixels.shape == (1, 3, 56, 56)
    shown = viz.display_images(pixels, transform)[0]
    assert np.abs(shown.astype(int) - colour).max() <= 1
    normalisation = (tuple(processor.image_mean), tuple(processor.image_std))
    assert viz.normalisation_of(transform) == viz.normalisation_of(SimpleNamespace(image_processor=processor)) \
        == normalisation
    assert normalisation[0] != viz.normalisation_of(CLIPImageProcessor(image_mean=0.5, image_std=0.5))[0]
    with pytest.warns(UserWarning, match="no normalisation"):
        viz.display_images(transform(Image.new("RGB", (224, 224), colour))[None], lambda image: image)


def test_token_count_bars_are_the_results_counts(encoded) -> None:
    _, result, names = encoded
    ax = viz.plot_token_counts(result, names)
    inputs, outputs = ax.containers
    np.testing.assert_array_equal([bar.get_width() for bar in inputs], result.counts[:, 0].numpy())
    np.testing.assert_array_equal([bar.get_width() for bar in outputs], result.counts[:, -1].numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text().strip() for t in ax.texts] == [f"{a} → {b}" for a, b in result.counts[:, [0, -1]].tolist()]


def test_layer_curves_and_band_are_the_counts_mean_and_std(encoded) -> None:
    _, result, names = encoded
    ax = viz.plot_layer_counts(result, names)
    counts = result.counts.numpy()
    for line, row, name in zip(ax.lines, counts, names):
        np.testing.assert_array_equal(line.get_ydata(), row)
        assert line.get_gid() == name
    mean_line = ax.lines[len(names)]
    np.testing.assert_allclose(mean_line.get_ydata(), counts.mean(0))
    band = ax.collections[0].get_paths()[0].vertices
    for x in range(counts.shape[1]):
        ys = band[np.isclose(band[:, 0], x), 1]
        np.testing.assert_allclose([ys.min(), ys.max()], [counts[:, x].mean() - counts[:, x].std(),
                                                          counts[:, x].mean() + counts[:, x].std()])


def test_counts_from_several_batches_are_stacked_in_order(encoded) -> None:
    _, result, _ = encoded
    parts = [result.select(b) for b in range(result.counts.shape[0])]
    np.testing.assert_array_equal(stats.count_matrix(parts), result.counts.numpy())
    np.testing.assert_array_equal(stats.count_matrix(result.counts[0]), result.counts[:1].numpy())
    ax = viz.plot_layer_counts(parts[1])  # one image: its line and a zero-width band
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), result.counts[1].numpy())


def test_histogram_counts_every_final_count_once(encoded) -> None:
    _, result, _ = encoded
    ax = viz.plot_count_histogram(result, bins=[0, 5, 10, 17])
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_array_equal(heights, np.histogram(result.counts[:, -1].numpy(), [0, 5, 10, 17])[0])
    assert sum(heights) == result.counts.shape[0]


def test_count_summary_has_the_three_panels(encoded) -> None:
    _, result, names = encoded
    fig = viz.plot_count_summary(result, names)
    bars, curves, hist = fig.axes
    np.testing.assert_array_equal([b.get_width() for b in bars.containers[1]], result.counts[:, -1].numpy())
    assert len(curves.lines) == len(names) + 1 and sum(p.get_height() for p in hist.patches) == len(names)


def test_count_comparison_overlays_sets_on_shared_bins(encoded) -> None:
    _, result, _ = encoded
    sets = {"calibration": result.counts[:2], "held-out": result.counts[2:]}
    fig = viz.plot_count_comparison(sets, target=5)
    curves, hist = fig.axes
    for line, counts in zip(curves.lines, sets.values()):
        np.testing.assert_allclose(line.get_ydata(), counts.numpy().mean(0))
    assert [line.get_ydata()[0] for line in curves.lines[2:]] == [5]
    lefts = {round(p.get_x(), 9) for p in hist.patches}
    assert len(hist.patches) == 2 * len(lefts)  # both sets drawn on the same bins


def test_complexity_plot_shows_numpys_correlation_of_the_plotted_points(encoded) -> None:
    images, result, names = encoded
    complexity = [stats.jpeg_bytes_per_pixel(image) for image in images]
    ax = viz.plot_complexity(complexity, result, names, kinds=["a", "b", "a", "b"])
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert sorted(map(tuple, points)) == sorted(zip(complexity, result.counts[:, -1].tolist()))
    shown = float(re.search(r"r = (-?[0-9.]+)", ax.get_title()).group(1))
    assert shown == pytest.approx(np.corrcoef(points[:, 0], points[:, 1])[0, 1], abs=5e-4)
    fit = ax.lines[0]
    slope = np.diff(fit.get_ydata()) / np.diff(fit.get_xdata())
    assert slope[0] == pytest.approx(np.polyfit(points[:, 0], points[:, 1], 1)[0])


def test_jpeg_bytes_per_pixel_grows_with_content() -> None:
    ladder = [stats.jpeg_bytes_per_pixel(dymu_viz.shapes_image(n)) for n in (0, 4, 32)]
    photo = stats.jpeg_bytes_per_pixel(dymu_viz.sample_photos(["astronaut"])["astronaut"])
    assert ladder == sorted(ladder) and ladder[-1] < photo
    assert stats.jpeg_bytes_per_pixel(np.asarray(dymu_viz.shapes_image(4))) == pytest.approx(ladder[1])


def test_threshold_profile_lines_are_the_values_with_gaps_where_blocks_never_merge() -> None:
    a = dymu_viz.Thresholds([0.9, 0.8, 0.85, 0.95], [3, 0, 2, 1])
    b = [0.99, float("inf"), 0.7, 0.75]
    ax = viz.plot_thresholds({"a": a, "b": b})
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.9, np.nan, 0.85, 0.95])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [0.99, np.nan, 0.7, 0.75])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a (1 blocks never merge)", "b (1 blocks never merge)"]
    single = viz.plot_thresholds(a)
    np.testing.assert_array_equal(single.lines[0].get_xdata(), [1, 2, 3, 4])  # block k: the count after it


def test_physical_virtual_bars_and_accounting(encoded) -> None:
    images, result, names = encoded
    acc = stats.token_accounting(result)
    np.testing.assert_array_equal(acc["physical"], result.counts[:, -1].numpy() - 1)  # CLS excluded
    np.testing.assert_array_equal(acc["virtual"], [16] * len(names))
    full = stats.encoder_flops([17] * 4, 64, 256)
    expected = [stats.encoder_flops(row, 64, 256) / full for row in result.counts.tolist()]
    np.testing.assert_allclose(acc["encoder_flops"], expected)
    assert (acc["encoder_flops"] < 1).all()
    ax = viz.plot_physical_virtual(result, names)
    virtual, physical = ax.containers
    np.testing.assert_array_equal([b.get_width() for b in physical], acc["physical"])
    np.testing.assert_array_equal([b.get_width() for b in virtual], acc["virtual"])


def test_padding_costs_only_attention_at_the_longest_length() -> None:
    """Norms, projections and MLPs run on valid tokens only; attention runs every image of a
    padded batch at the longest length, and that is the whole overhead."""
    counts, width, hidden = torch.tensor([[10, 6, 4], [10, 10, 8]]), 8, 32
    valid = sum(stats.encoder_flops(row, width, hidden) for row in counts.tolist())
    extra = 2 * 2 * (10 ** 2 - 6 ** 2) * width  # block 1: image 0 attends at 10 tokens, not 6
    assert stats.padded_flop_overhead(counts, width, hidden) == pytest.approx(extra / valid)
    assert stats.padded_flop_overhead(counts[:1], width, hidden) == 0


def test_count_table_lists_every_image_and_the_mean(encoded) -> None:
    _, result, names = encoded
    table = stats.count_table(result, names, layers=[1, 3]).splitlines()
    assert len(table) == len(names) + 2
    for line, name, row in zip(table[1:], names, result.counts.tolist()):
        assert line.split() == [name, str(row[0]), "->", str(row[-1]), str(row[1]), str(row[3])]
    finals = result.counts[:, -1].double()
    assert table[-1].endswith(f"{finals.mean():.1f} ± {finals.std(unbiased=False):.1f}")


def test_png_of_a_figure_is_a_png(encoded) -> None:
    _, result, _ = encoded
    assert viz.figure_png(viz.plot_layer_counts(result).figure).startswith(b"\x89PNG")


VLM_ACCOUNTING = [  # as vlm.generate returns it: two samples of one batch
    {"image_tokens": 120, "image_positions": 576, "llm_compact_length": 135, "llm_virtual_length": 591,
     "generated_tokens": 8, "kv_cache_entries": 142, "kv_cache_bytes_per_sample_padded": 3 * 2 ** 20},
    {"image_tokens": 300, "image_positions": 576, "llm_compact_length": 312, "llm_virtual_length": 588,
     "generated_tokens": 8, "kv_cache_entries": 319, "kv_cache_bytes_per_sample_padded": 3 * 2 ** 20},
]


def test_vlm_accounting_bars_are_the_per_sample_numbers() -> None:
    ax = viz.plot_vlm_accounting(VLM_ACCOUNTING, ["cat", "rocket"])
    virtual, compact, image = ax.containers
    for bars, key in ((virtual, "llm_virtual_length"), (compact, "llm_compact_length"), (image, "image_tokens")):
        assert [b.get_width() for b in bars] == [acc[key] for acc in VLM_ACCOUNTING]
        assert [b.get_y() + b.get_height() / 2 for b in bars] == [0, 1]
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), [[142, 0], [319, 1]])  # KV-cache ticks
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "rocket"]
    assert [t.get_text().strip() for t in ax.texts] == ["img 120/576 · LLM 135/591 · KV 142, 3.00 MiB",
                                                        "img 300/576 · LLM 312/588 · KV 319, 3.00 MiB"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted([label for _, label, _ in viz.VLM_BARS] + ["KV-cache entries"])


def test_vlm_text_names_the_decode_fast_key_entries() -> None:
    compact, fast = dict(VLM_ACCOUNTING[0], kv_key_entries=142), dict(VLM_ACCOUNTING[0], kv_key_entries=598)
    assert viz.vlm_text(compact) == "img 120/576 · LLM 135/591 · KV 142, 3.00 MiB"
    assert viz.vlm_text(fast) == "img 120/576 · LLM 135/591 · KV 142 values + 598 keys, 3.00 MiB"


def test_vlm_accounting_without_generation_has_no_kv_ticks() -> None:
    prepared = [{k: v for k, v in acc.items() if k.startswith(("image", "llm"))} for acc in VLM_ACCOUNTING]
    ax = viz.plot_vlm_accounting(prepared)
    assert not ax.collections and [t.get_text() for t in ax.get_yticklabels()] == ["image 0", "image 1"]
    assert ax.texts[0].get_text().strip() == "img 120/576 · LLM 135/591"


def test_vlm_accounting_compares_runs_sample_by_sample() -> None:
    full = [dict(acc, image_tokens=576, llm_compact_length=acc["llm_virtual_length"]) for acc in VLM_ACCOUNTING]
    ax = viz.plot_vlm_accounting({"vtu": VLM_ACCOUNTING, "full": full}, ["cat", "rocket"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat · vtu", "cat · full", "rocket · vtu", "rocket · full"]
    assert [b.get_width() for b in ax.containers[2]] == [120, 576, 300, 576]
    assert [b.get_width() for b in ax.containers[1]] == [135, 591, 312, 588]
    with pytest.raises(ValueError, match="same samples"):
        viz.plot_vlm_accounting({"vtu": VLM_ACCOUNTING, "one": VLM_ACCOUNTING[:1]})
    with pytest.raises(ValueError, match="one name per image"):
        viz.plot_vlm_accounting(VLM_ACCOUNTING, ["cat"])


def test_unit_merge_maps_fill_each_merged_token_of_the_unit_grid() -> None:
    from PIL import Image

    image = Image.fromarray(np.tile(np.arange(84, dtype=np.uint8)[None, :, None], (56, 1, 3)))  # 2 x 3 units
    mapping = torch.tensor([0, 0, 1, 0, 0, 1])  # the left 2 x 2 units are one token
    fig = viz.plot_unit_merge_maps([image], [mapping], torch.tensor([[1, 4, 6]]), ["ramp"])
    shown, merged = (ax.images[0].get_array() for ax in fig.axes)
    assert shown.shape == merged.shape == (56, 84, 3)
    assert np.all(merged[5, 5] == np.round(shown[:, :56].reshape(-1, 3).mean(0)))  # the group's mean colour
    assert [ax.get_title() for ax in fig.axes] == ["ramp: 2 x 3 units", "2 tokens of 6"]


EVAL_ROWS = [{"setting": "full", "accuracy": 0.5, "image_tokens": 576.0, "image_tokens_std": 0.0, "seconds": 0.4},
             {"setting": "DyMU", "accuracy": 0.45, "image_tokens": 90.0, "image_tokens_std": 27.0, "seconds": 0.2}]


def test_eval_tradeoff_puts_each_setting_at_its_tokens_seconds_and_flops():
    fig = viz.plot_eval_tradeoff(EVAL_ROWS)
    tokens, seconds = fig.axes  # no FLOPs in these rows: two panels
    assert [t.get_text() for t in tokens.get_legend().get_texts()] == ["full", "DyMU"]
    xs = [line.get_xdata()[0] for line in seconds.lines]
    assert xs == [0.4, 0.2]
    assert tokens.get_xlabel().startswith("image tokens") and tokens.get_ylabel() == "accuracy"
    rows = [dict(r, gflops=g) for r, g in zip(EVAL_ROWS, (51.0, 30.5))]
    fig = viz.plot_eval_tradeoff(rows + [dict(rows[1], setting="ToMe")], note="RANDOM weights: accuracy means nothing")
    tokens, seconds, flops = fig.axes
    assert flops.get_xlabel() == "GFLOPs per sample" and [line.get_xdata()[0] for line in flops.lines] == [51.0, 30.5, 30.5]
    assert fig.get_suptitle() == "RANDOM weights: accuracy means nothing"
    # DyMU and ToMe on one spot: different hollow markers of different sizes, both visible
    dymu, tome = tokens.containers[1][0], tokens.containers[2][0]  # the errorbars' data markers
    assert dymu.get_marker() != tome.get_marker() and dymu.get_markersize() > tome.get_markersize()
    assert dymu.get_markerfacecolor() == "none"


def test_token_extremes_shows_the_fewest_median_and_most():
    images = [np.full((8, 8, 3), v, dtype=np.uint8) for v in (10, 20, 30, 40, 50)]
    fig = viz.plot_token_extremes([30, 5, 90, 12, 40], images, ["a", "b", "c", "d", "e"])
    hist, *thumbs = fig.axes
    assert [ax.get_title() for ax in thumbs] == ["fewest: b, 5", "median: a, 30", "most: c, 90"]
    assert thumbs[0].images[0].get_array()[0, 0, 0] == 20  # b's picture
    assert "35.4 ± " in hist.get_title()
    with pytest.raises(ValueError, match="2 names for 5 images"):
        viz.plot_token_extremes([1, 2, 3, 4, 5], images, ["a", "b"])
