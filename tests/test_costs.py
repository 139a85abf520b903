"""Stage-by-stage cost (``dymu_viz.vlm.costs``) on tiny random LLaVA-1.5 / OneVision: the
stages add up to the generate's forwards, FLOPs follow the measured counts, and the table flags
a setting slower than full. Times are only checked for being positive; speed is measured in the
benchmarks, never asserted."""

from __future__ import annotations

import pytest

from dymu_viz import sample_photos, vlm
from dymu_viz.stats import encoder_flops
from dymu_viz.vlm.baselines import Pool
from dymu_viz.vlm.costs import cost_table, llm_decode_flops, llm_prefill_flops, stage_costs
from tiny_models import VLM_QUESTIONS, tiny_vlm

pytestmark = pytest.mark.usefixtures("no_grad")


def one_sample(processor) -> dict:
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": VLM_QUESTIONS[0]}]}],
                                         add_generation_prompt=True)
    return dict(processor(images=[sample_photos(["chelsea"])["chelsea"]], text=[text], return_tensors="pt"))


@pytest.mark.parametrize("family", ["llava", "onevision"])
def test_stage_costs_follow_the_measured_counts(family: str) -> None:
    model, processor = tiny_vlm(family, patch_size=7)
    inputs = one_sample(processor)
    cfg, vision = model.config.get_text_config(), model.config.vision_config
    rows = {}
    for setting, spec, mode in [("full", None, "full"), ("dymu", 0.9, "vtu"), ("pool", Pool(2, 2), "compact")]:
        vlm.patch_vlm(model, spec, mode=mode)
        rows[setting] = row = stage_costs(model, inputs, new_tokens=4, warmup=1, reps=2)
        assert all(row[f"{s}_s"] > 0 for s in ("vision", "prefill", "decode"))
        assert row["total_s"] == pytest.approx(row["vision_s"] + row["prefill_s"] + row["decode_s"])
        assert row["decode_s_per_token"] == pytest.approx(row["decode_s"] / 3)
        assert row["prefill_flops"] == llm_prefill_flops(cfg, row["llm_compact_length"], row["llm_virtual_length"], 1)
        assert row["decode_flops"] == llm_decode_flops(cfg, 3, row["llm_virtual_length"])
        assert row["peak_mib"] is None  # CPU: no peak-memory figure rather than a wrong one
    full, dymu, pool = rows["full"], rows["dymu"], rows["pool"]
    assert full["llm_compact_length"] == full["llm_virtual_length"] == inputs["input_ids"].shape[1]
    assert dymu["image_tokens"] < full["image_tokens"] and dymu["llm_virtual_length"] == full["llm_virtual_length"]
    assert dymu["vision_flops"] < full["vision_flops"] == pool["vision_flops"]  # pooling runs the whole tower
    assert pool["prefill_flops"] < full["prefill_flops"] and pool["llm_virtual_length"] == pool["llm_compact_length"]
    crops = 1 if family == "llava" else len(model.model.vision_tower.dymu.last.counts)
    blocks = model.config.vision_feature_layer % (vision.num_hidden_layers + 1)
    tokens = 64 + (1 if family == "llava" else 0)  # CLIP's CLS token
    assert full["vision_flops"] == crops * encoder_flops([tokens] * (blocks + 1), vision.hidden_size,
                                                         vision.intermediate_size)


def test_flops_formulas_by_hand() -> None:
    from types import SimpleNamespace

    # 2 heads of 4 (q width 8), 1 KV head (width 4), MLP 16, vocabulary 50, 3 layers
    cfg = SimpleNamespace(hidden_size=8, num_key_value_heads=1, num_attention_heads=2, intermediate_size=16,
                          num_hidden_layers=3, vocab_size=50)
    per_row = 2 * (8 * 8 + 8 * 8 + 8 * 4 + 8 * 4 + 3 * 8 * 16)  # q, o, k, v, gate / up / down
    assert per_row == 1152
    assert llm_prefill_flops(cfg, 10, 20) == 3 * (10 * 1152 + 2 * 2 * 20 * 20 * 8)
    assert llm_prefill_flops(cfg, 10, 20, logits=1) == llm_prefill_flops(cfg, 10, 20) + 2 * 8 * 50
    step = 3 * 1152 + 2 * 8 * 50  # one row through every layer, then the LM head
    assert llm_decode_flops(cfg, 2, 20) == 2 * step + 3 * 2 * 2 * 8 * (21 + 22)


def test_cost_table_flags_a_setting_slower_than_full() -> None:
    def row(setting, total):
        return dict(sample="cat", setting=setting, image_tokens=10, vision_s=total / 2, prefill_s=total / 4,
                    decode_s=total / 4, decode_s_per_token=0.1, total_s=total, vision_flops=None, prefill_flops=2e9,
                    decode_flops=1e9, peak_mib=None)

    lines = cost_table([row("full", 1.0), row("dymu", 0.8), row("tome", 1.2)]).splitlines()
    assert lines[2].endswith("| 1.00 |") and lines[3].endswith("| 0.80 |") and lines[4].endswith("| 1.20 SLOWER |")
    assert "| - | 2 | 1 | - |" in lines[3]  # unknown FLOPs and peak memory are shown as such


def test_stage_cost_plot_stacks_the_stages_and_marks_slower_settings() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from dymu_viz import viz

    rows = [dict(sample="cat", setting=s, vision_s=v, prefill_s=p, decode_s=d, total_s=v + p + d)
            for s, v, p, d in [("full", 0.5, 0.3, 0.2), ("dymu", 0.5, 0.1, 0.2), ("tome", 0.6, 0.3, 0.3)]]
    ax = viz.plot_stage_costs(rows)
    bars = [(round(b.get_x(), 6), round(b.get_width(), 6)) for b in ax.patches]
    assert bars[:3] == [(0, 0.5), (0, 0.5), (0, 0.6)]  # vision first, then prefill after it
    assert bars[3:6] == [(0.5, 0.3), (0.5, 0.1), (0.6, 0.3)]
    notes = [t.get_text() for t in ax.texts]
    assert "SLOWER" in notes[2] and not any("SLOWER" in n for n in notes[:2])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat · full", "cat · dymu", "cat · tome"]


def test_stage_costs_on_qwen_with_rounds_only_count_the_vanilla_tower() -> None:
    from dymu_viz.vlm.families.qwen_tower import qwen_tower_flops
    from tiny_models import tiny_qwen

    model, processor = tiny_qwen("2.5")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                        {"type": "text", "text": VLM_QUESTIONS[0]}]}],
                                         add_generation_prompt=True)
    inputs = dict(processor(images=[sample_photos(["rocket"])["rocket"]], text=[text], return_tensors="pt"))
    vlm.patch_vlm(model, [0.5] * 2)
    row = stage_costs(model, inputs, new_tokens=2, warmup=0, reps=1)
    assert row["vision_flops"] == qwen_tower_flops(model.model.visual, inputs["image_grid_thw"].tolist())["total"]
    assert row["image_tokens"] < row["llm_virtual_length"]
