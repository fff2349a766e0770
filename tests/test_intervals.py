"""The interval code against values worked out by hand.

Student-t quantiles from tables: t_{0.975,1} = 12.706205, t_{0.975,2} = 4.302653,
t_{0.95,2} = 2.919986. Half-width = t * s / sqrt(n) with the sample std s (ddof=1).
"""

from __future__ import annotations

import math

import pytest

from experiments.results.intervals import (
    CONFIDENCE,
    MET,
    MISSED,
    UNDECIDED,
    Interval,
    mean_interval,
    paired_difference,
    paired_ratio,
    verdict,
)

SQRT3 = 1.7320508


def test_three_values_mean_and_t_half_width():
    # [1, 2, 3]: mean 2, s = 1, half-width 4.302653 * 1 / sqrt(3) = 2.484138
    interval = mean_interval([1.0, 2.0, 3.0])
    assert CONFIDENCE == 0.95
    assert interval.n == 3 and interval.mean == pytest.approx(2.0)
    assert interval.half_width == pytest.approx(2.484138, abs=1e-6)
    assert interval.low == pytest.approx(2.0 - 2.484138, abs=1e-6)
    assert interval.high == pytest.approx(2.0 + 2.484138, abs=1e-6)


def test_other_confidence_uses_its_own_quantile():
    # 90 %: t_{0.95,2} = 2.919986 -> half-width 2.919986 / sqrt(3) = 1.685855
    assert mean_interval([1.0, 2.0, 3.0], confidence=0.90).half_width == pytest.approx(2.919986 / SQRT3, abs=1e-6)


def test_sample_std_not_population_std():
    # two values 0.80, 0.90: s (ddof=1) = 0.070711, half-width 12.706205 * 0.070711 / sqrt(2) = 0.635310;
    # the population std (0.05) would give 0.449
    assert mean_interval([0.80, 0.90]).half_width == pytest.approx(0.635310, abs=1e-6)


def test_nan_and_none_are_dropped_and_n_counts_the_rest():
    # [1, NaN, 3, None]: kept 1, 3 -> mean 2, s = sqrt(2), half-width 12.706205 * sqrt(2) / sqrt(2)
    interval = mean_interval([1.0, math.nan, 3.0, None])
    assert interval.n == 2 and interval.mean == pytest.approx(2.0)
    assert interval.half_width == pytest.approx(12.706205, abs=1e-6)


def test_one_value_has_a_mean_and_no_interval_and_none_has_nothing():
    one = mean_interval([0.7])
    assert (one.mean, one.n) == (0.7, 1) and math.isnan(one.low) and math.isnan(one.high)
    none = mean_interval([math.nan])
    assert none.n == 0 and math.isnan(none.mean)


def test_format_shows_mean_and_half_width_scaled():
    assert mean_interval([1.0, 2.0, 3.0]).format() == "2.0 ± 2.5"
    # [0.80, 0.85, 0.90]: mean 0.85, s = 0.05, half-width 4.302653 * 0.05 / sqrt(3) = 0.124207 -> points
    assert mean_interval([0.80, 0.85, 0.90]).format(scale=100, digits=2) == "85.00 ± 12.42"
    assert mean_interval([0.7]).format(scale=100) == "70.0"
    assert mean_interval([]).format() == "-"


def test_paired_difference_is_taken_seed_by_seed():
    # a - b = [0.1, 0.05, 0.15]: mean 0.1, s = 0.05, half-width 0.124207
    diff = paired_difference([0.9, 0.8, 0.85], [0.8, 0.75, 0.7])
    assert diff.n == 3 and diff.mean == pytest.approx(0.1)
    assert diff.half_width == pytest.approx(0.124207, abs=1e-6)


def test_pairing_removes_the_spread_both_sides_share():
    # each seed: a = b + 0.5 exactly, so the paired interval is the point 0.5 (met against >= 0), while
    # the two means' own intervals (2 +- 2.48 and 1.5 +- 2.48) overlap widely
    a, b = [1.0, 2.0, 3.0], [0.5, 1.5, 2.5]
    diff = paired_difference(a, b)
    assert (diff.mean, diff.low, diff.high) == pytest.approx((0.5, 0.5, 0.5))
    assert verdict(diff, 0.0) == MET
    assert mean_interval(a).low < mean_interval(b).high


def test_paired_difference_drops_a_seed_missing_on_either_side():
    # [1 - 0, NaN - 0, 3 - 1] = [1, NaN, 2]: n 2, mean 1.5, s = 0.707107, half-width 12.706205 * 0.5 = 6.353102
    diff = paired_difference([1.0, math.nan, 3.0], [0.0, 0.0, 1.0])
    assert diff.n == 2 and diff.mean == pytest.approx(1.5)
    assert diff.half_width == pytest.approx(6.353102, abs=1e-6)


def test_paired_ratio_per_seed_and_zero_denominator_dropped():
    # [1/4, 2/4, 3/4] = [0.25, 0.5, 0.75]: mean 0.5, s = 0.25, half-width 4.302653 * 0.25 / sqrt(3) = 0.621034
    ratio = paired_ratio([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    assert ratio.mean == pytest.approx(0.5) and ratio.half_width == pytest.approx(0.621034, abs=1e-6)
    # a ratio of means would be 6 / 6 = 1; per seed it is [2, 0.5] -> 1.25
    assert paired_ratio([2.0, 4.0], [1.0, 8.0]).mean == pytest.approx(1.25)
    dropped = paired_ratio([1.0, 2.0], [0.0, 4.0])
    assert dropped.n == 1 and dropped.mean == pytest.approx(0.5)


@pytest.mark.parametrize("pair", [paired_difference, paired_ratio])
def test_paired_values_of_different_lengths_are_refused(pair):
    with pytest.raises(ValueError, match="one per seed on both sides, got 3 and 2"):
        pair([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("low", "high", "target", "at_least", "expected"),
    [
        (0.1, 0.3, 0.0, True, MET),  # wholly above a lower bound
        (0.0, 0.3, 0.0, True, MET),  # the bound is inclusive
        (-0.3, -0.1, 0.0, True, MISSED),  # wholly below it
        (-0.1, 0.3, 0.0, True, UNDECIDED),  # straddles it
        (0.10, 0.15, 0.2, False, MET),  # wholly below an upper bound
        (0.10, 0.20, 0.2, False, MET),  # inclusive
        (0.25, 0.30, 0.2, False, MISSED),  # wholly above it
        (0.15, 0.25, 0.2, False, UNDECIDED),
    ],
)
def test_verdict_both_directions(low, high, target, at_least, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3), target, at_least) == expected


def test_one_seed_is_undecided_even_far_from_the_target():
    assert verdict(mean_interval([0.9]), 0.0) == UNDECIDED
    assert verdict(mean_interval([0.9]), 1.0, at_least=False) == UNDECIDED
    assert verdict(mean_interval([]), 0.0) == UNDECIDED


def test_verdict_of_a_measured_interval():
    # [0.1, 0.05, 0.15] -> 0.1 +- 0.124: straddles 0 (undecided), wholly under 0.3 (met), wholly over -0.1 (met)
    diff = paired_difference([0.9, 0.8, 0.85], [0.8, 0.75, 0.7])
    assert verdict(diff, 0.0) == UNDECIDED
    assert verdict(diff, 0.3, at_least=False) == MET
    assert verdict(diff, -0.1) == MET
    assert verdict(diff, -0.05, at_least=False) == MISSED
