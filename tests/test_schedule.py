"""Golden schedules and token counts: dymu-spec.md section 3.1 (table of shipped configs) and
peers.md section 10, Test 1 (ToMe's parse_r and notebook token counts)."""

from __future__ import annotations

import pytest

from dymu_viz import kout_r_total, make_schedule, parse_r, token_counts
from dymu_viz import schedule as S

# ---- dymu-spec.md section 3.1, "Computed schedules for the shipped configs" --------------
CLIP_L_504_LINEAR = [42, 40, 38, 36, 35, 33, 31, 29, 28, 26, 24, 22, 21, 19, 17, 15, 14, 12, 10,
                     8, 4, 0, 0, 0]
CLIP_L_384_LINEAR = [32, 30, 29, 28, 26, 25, 24, 22, 21, 20, 18, 17, 16, 14, 13, 12, 10, 9, 8, 6,
                     4, 0, 0, 0]
CLIP_L_384_REVERSE = [0, 0, 0, 4, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20, 21, 22, 24, 25, 26, 28,
                      29, 30, 32]
SIGLIP_B_504_LINEAR = [84, 77, 70, 63, 56, 49, 42, 35, 28, 0, 0, 0]

GOLDEN = [
    # (r_total, layers, schedule, expected)
    (504, 24, "constant", [21] * 24),                  # ViT-L-14-336-tome-72out
    (504, 24, "linear", CLIP_L_504_LINEAR),             # ...-72out-linear
    (384, 24, "constant", [16] * 24),                  # ...-192out
    (384, 24, "linear", CLIP_L_384_LINEAR),             # ...-192out-linear
    (384, 24, "reverse_linear", CLIP_L_384_REVERSE),    # ...-192out-reverse-linear
    (192, 24, "constant", [8] * 24),                   # ...-384out
    (96, 24, "constant", [4] * 24),                    # ...-480out
    (0, 24, "constant", [0] * 24),                     # ...-nomerge
    (504, 12, "constant", [42] * 12),                  # siglip_384_tome_72out
    (504, 12, "linear", SIGLIP_B_504_LINEAR),           # ..._72out_linear
    (384, 12, "constant", [32] * 12),                  # ..._192out
    (192, 12, "constant", [16] * 12),                  # ..._384out
    (96, 12, "constant", [8] * 12),                    # ..._480out and siglip_224_tome
    (0, 12, "constant", [0] * 12),                     # ..._no_merge
    (537, 27, "constant", [20] * 24 + [19] * 3),       # so400m_patch14_siglip_384_tome_192out
]


@pytest.mark.parametrize("r_total,layers,schedule,expected", GOLDEN,
                         ids=[f"{g[0]}-{g[1]}-{g[2]}" for g in GOLDEN])
def test_make_schedule_matches_spec_table(r_total, layers, schedule, expected):
    assert sum(expected) == r_total  # the table itself is consistent
    got = make_schedule(r_total, layers, schedule)
    assert got == expected
    assert len(got) == layers and sum(got) == r_total


def test_reverse_linear_is_linear_reversed():
    assert make_schedule(384, 24, "reverse_linear") == CLIP_L_384_LINEAR[::-1]
    assert make_schedule(504, 12, "reverse-linear") == SIGLIP_B_504_LINEAR[::-1]  # dash spelling


@pytest.mark.parametrize("schedule", S.SCHEDULES)
@pytest.mark.parametrize("layers", [1, 12, 24, 27])
@pytest.mark.parametrize("r_total", [0, 1, 7, 96, 384, 504, 537, 648])
def test_schedules_sum_to_r_total(r_total, layers, schedule):
    rs = make_schedule(r_total, layers, schedule)
    assert len(rs) == layers and sum(rs) == r_total and min(rs) >= 0


def test_constant_remainder_goes_to_first_layers():
    rs = make_schedule(648 + 5, 27, "constant")
    assert rs == [25] * 5 + [24] * 22


def test_linear_is_front_loaded_with_trailing_zeros():
    rs = make_schedule(504, 24, "linear")
    nonzero = [v for v in rs if v]
    assert nonzero == sorted(nonzero, reverse=True)
    assert rs[-3:] == [0, 0, 0]


def test_unknown_schedule_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="cosine"):
        make_schedule(504, 24, "cosine")
    with pytest.raises(ValueError):
        make_schedule(504, 0, "constant")
    with pytest.raises(ValueError):
        make_schedule(-1, 24, "constant")


# ---- ToMe's parse_r (peers.md Test 1) ------------------------------------------------------

def test_parse_r_goldens():
    ramp = parse_r(12, (16, -1.0))
    assert ramp == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert sum(ramp) == 187
    assert parse_r(12, 16) == [16] * 12
    assert parse_r(12, (16, 0.0)) == [16] * 12
    # inflection +1 increases from 0 to 2r
    up = parse_r(12, (16, 1.0))
    assert up[0] == 0 and up[-1] == 32 and up == sorted(up)


def test_parse_r_lists():
    assert parse_r(12, [5, 4, 3]) == [5, 4, 3] + [0] * 9
    assert parse_r(4, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert parse_r(3, []) == [0, 0, 0]
    with pytest.raises(ValueError, match="13"):
        parse_r(12, [1] * 13)
    with pytest.raises(ValueError):
        parse_r(12, (1, 2, 3))


# ---- token counts (ToMe notebook goldens, peers.md Test 1) -------------------------------

@pytest.mark.parametrize("rs,final", [
    ([25] * 8, 377),
    ([25] * 16, 177),
    ([25] * 22, 27),
    ([25] * 24, 8),  # the cap binds in the last two layers
])
def test_token_counts_vit_l_384(rs, final):
    counts = token_counts(577, rs, protected=1)
    assert len(counts) == len(rs) + 1 and counts[0] == 577
    assert counts[-1] == final


def test_token_counts_cap_binds_last_layers_of_vit_l():
    counts = token_counts(577, [25] * 24, protected=1)
    assert counts[-3:] == [27, 14, 8]  # 27 - min(25, 13), 14 - min(25, 6)


@pytest.mark.parametrize("r,final", [(16, 11), (13, 41), (8, 101), ((16, -1.0), 10)])
def test_token_counts_vit_b_16(r, final):
    assert token_counts(197, parse_r(12, r), protected=1)[-1] == final


def test_token_counts_cap_without_cls():
    # all-equal tokens merge the cap every layer (peers.md Test 2.6, so400m: no CLS)
    counts = token_counts(729, [10**6] * 12, protected=0)
    assert counts[:12] == [729, 365, 183, 92, 46, 23, 12, 6, 3, 2, 1, 1]
    counts = token_counts(577, [10**6] * 12, protected=1)
    assert counts == [577, 289, 145, 73, 37, 19, 10, 6, 4, 3, 2, 2, 2]


# ---- Kout presets -----------------------------------------------------------------------

def test_kout_r_total():
    assert kout_r_total("72out", 576) == 504
    assert kout_r_total("192out", 576) == 384
    assert kout_r_total("81out", 729) == 648
    assert kout_r_total("576out", 576) == 0


@pytest.mark.parametrize("name", ["72", "out", "72outs", "seventy-two-out", "-72out", "72 out"])
def test_kout_bad_name_raises(name):
    with pytest.raises(ValueError, match="Kout|out"):
        kout_r_total(name, 576)
    try:
        kout_r_total(name, 576)
    except ValueError as err:
        assert repr(name) in str(err)


def test_kout_too_many_tokens_raises():
    with pytest.raises(ValueError, match=r"600.*576|576.*600"):
        kout_r_total("600out", 576)
    with pytest.raises(ValueError):
        kout_r_total("0out", 576)
