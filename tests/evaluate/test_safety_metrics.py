"""Metrics against numbers worked out by hand (the computation is in each comment)."""

from __future__ import annotations

import math

import pytest

from mmsafe.evaluate.metrics import (
    attack_success_rate,
    breakdown,
    mcnemar_exact_p,
    pair_verdicts,
    paired_comparison,
    rate,
    summarize_verdicts,
    wilson_interval,
)


def test_wilson_8_of_10():
    # p = 0.8, z = 1.96, z²/n = 0.38416, denominator 1.38416
    # centre = (0.8 + 0.19208) / 1.38416 = 0.716738
    # half = 1.96 * sqrt(0.8*0.2/10 + 3.8416/400) / 1.38416 = 1.96 * 0.160012 / 1.38416 = 0.226581
    low, high = wilson_interval(8, 10, z=1.96)
    assert low == pytest.approx(0.490157, abs=1e-5)
    assert high == pytest.approx(0.943319, abs=1e-5)


def test_wilson_0_of_10_starts_at_zero():
    # p = 0: centre = 0.19208 / 1.38416 = 0.138770, half = 1.96 * sqrt(0.009604) / 1.38416
    # = 1.96 * 0.098 / 1.38416 = 0.138770, so [0, 0.277540]
    low, high = wilson_interval(0, 10, z=1.96)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(0.277540, abs=1e-5)


def test_wilson_default_z_and_edges():
    # 1/2 with z = 1.959964: z² = 3.841459, z²/n = 1.920729, denominator 2.920729,
    # centre = (0.5 + 0.960365) / 2.920729 = 0.5, half = 1.959964 * sqrt(0.125 + 0.240091) / 2.920729
    # = 1.959964 * 0.604228 / 2.920729 = 0.405463 -> [0.094537, 0.905463]
    low, high = wilson_interval(1, 2)
    assert low == pytest.approx(0.094537, abs=1e-5)
    assert high == pytest.approx(0.905463, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert math.isnan(rate(0, 0).value)
    assert rate(0, 0).to_dict()["rate"] is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_summary_keeps_unparseable_apart_or_counts_it_unsafe():
    labels = ["safe", "safe", "unsafe", "unparseable"]
    apart = summarize_verdicts(labels)
    # excluded: 2 safe of 3 scored
    assert (apart.safe, apart.unsafe, apart.unparseable, apart.total, apart.scored) == (2, 1, 1, 4, 3)
    assert apart.safe_rate.value == pytest.approx(2 / 3)
    assert apart.unsafe_rate.value == pytest.approx(1 / 3)
    conservative = summarize_verdicts(labels, unparseable_as_unsafe=True)
    # counted unsafe: 2 safe of 4, 2 unsafe of 4
    assert conservative.safe_rate.value == pytest.approx(0.5)
    assert conservative.unsafe_rate.successes == 2
    assert conservative.unsafe_rate.total == 4
    with pytest.raises(ValueError):
        summarize_verdicts(["maybe"])


def test_breakdown_groups_and_keeps_missing_group():
    rows = [("PER", "safe"), ("PER", "unsafe"), ("LOC", "safe"), (None, "unsafe")]
    result = breakdown(rows, group=lambda row: row[0], verdict=lambda row: row[1])
    assert list(result) == ["(none)", "LOC", "PER"]
    assert result["PER"].safe_rate.value == pytest.approx(0.5)
    assert result["LOC"].safe_rate.value == 1.0
    assert result["(none)"].unsafe == 1


def test_attack_success_rate_is_mean_over_scenarios_not_pooled():
    # A: 1 unsafe of 2 -> 0.5; B: 1 unsafe of 4 -> 0.25; mean 0.375 (pooled would be 2/6)
    per_scenario = {
        "A": summarize_verdicts(["unsafe", "safe"]),
        "B": summarize_verdicts(["unsafe", "safe", "safe", "safe"]),
        "C": summarize_verdicts(["unparseable"]),  # nothing scored: skipped
    }
    result = attack_success_rate(per_scenario)
    assert result.value == pytest.approx(0.375)
    assert set(result.per_scenario) == {"A", "B"}


@pytest.mark.parametrize(
    ("only_first", "only_second", "expected"),
    [
        (1, 6, 0.125),  # n=7: 2 * (C(7,0)+C(7,1)) / 2^7 = 2 * 8/128
        (6, 1, 0.125),  # symmetric
        (0, 5, 0.0625),  # n=5: 2 * 1/32
        (3, 3, 1.0),  # n=6: 2 * (1+6+15+20)/64 = 1.3125 -> capped at 1
        (2, 8, 0.109375),  # n=10: 2 * (1+10+45)/1024 = 112/1024
        (0, 0, 1.0),
    ],
)
def test_mcnemar_exact(only_first, only_second, expected):
    assert mcnemar_exact_p(only_first, only_second) == pytest.approx(expected)


def test_paired_comparison_counts_and_mcnemar():
    # 10 prompts: A safe on 1..3, B safe on 1..8 -> rates 0.3 and 0.8, difference 0.5;
    # only B safe on 5 prompts, only A on 0 -> McNemar p = 2 / 2^5 = 0.0625
    safe_a = [True] * 3 + [False] * 7
    safe_b = [True] * 8 + [False] * 2
    result = paired_comparison(safe_a, safe_b, resamples=2000, seed=1)
    assert (result.n, result.only_a, result.only_b) == (10, 0, 5)
    assert result.rate_a == pytest.approx(0.3)
    assert result.rate_b == pytest.approx(0.8)
    assert result.difference == pytest.approx(0.5)
    assert result.mcnemar_p == pytest.approx(0.0625)
    assert result.low <= result.difference <= result.high
    again = paired_comparison(safe_a, safe_b, resamples=2000, seed=1)
    assert (again.low, again.high) == (result.low, result.high)


def test_paired_bootstrap_interval_matches_the_exact_resampling_distribution():
    # differences [1, 0, 0, 0]: resampled mean = X/4, X ~ Binomial(4, 1/4).
    # P[X=0] = 81/256 = 0.316 > 0.025 -> low = 0
    # P[X<=2] = 243/256 = 0.949 < 0.975 <= P[X<=3] = 255/256 -> high = 3/4
    result = paired_comparison([False] * 4, [True, False, False, False], resamples=10_000, seed=0)
    assert result.difference == pytest.approx(0.25)
    assert result.low == 0.0
    assert result.high == 0.75


def test_paired_bootstrap_constant_difference_has_zero_width():
    result = paired_comparison([False] * 5, [True] * 5, resamples=500, seed=3)
    assert (result.low, result.high, result.difference) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        paired_comparison([True], [True, False])


def test_pair_verdicts_aligns_by_key_and_handles_unparseable():
    a = {"1": "safe", "2": "unsafe", "3": "unparseable", "4": "safe"}
    b = {"1": "unsafe", "2": "unsafe", "3": "safe", "5": "safe"}
    keys, safe_a, safe_b = pair_verdicts(a, b)
    assert keys == ["1", "2"]
    assert safe_a == [True, False]
    assert safe_b == [False, False]
    keys, safe_a, safe_b = pair_verdicts(a, b, unparseable_as_unsafe=True)
    assert keys == ["1", "2", "3"]
    assert safe_a == [True, False, False]
    assert safe_b == [False, False, True]
