"""evaluation/stats.py against hand-computed cases: exact McNemar, sign-flip, degenerate and seeded bootstraps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation import stats


def paired_table(both: int, only_before: int, only_after: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Paired pass/fail outcomes with the given 2x2 counts."""
    before = [True] * both + [True] * only_before + [False] * only_after + [False] * neither
    after = [True] * both + [False] * only_before + [True] * only_after + [False] * neither
    return before, after


def test_exact_mcnemar_on_a_known_table():
    before, after = paired_table(both=30, only_before=1, only_after=9, neither=60)
    result = stats.mcnemar_exact(before, after)
    assert (result.b, result.c) == (1, 9)
    # 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * (C(10,0) + C(10,1)) / 2^10
    assert result.p == 2 * (1 + 10) / 1024 == 0.021484375
    assert stats.mcnemar_exact(after, before).p == result.p  # two-sided: symmetric in b and c


def test_mcnemar_edge_cases():
    assert stats.mcnemar_exact([True, False], [True, False]).p == 1.0  # b + c = 0
    assert stats.mcnemar_exact([True], [False]).p == 1.0  # one discordant pair: 2 * 1/2
    before, after = paired_table(0, 0, 5, 0)
    assert stats.mcnemar_exact(before, after).p == 2 / 32  # all 5 discordant the same way
    before, after = paired_table(0, 5, 5, 0)
    assert stats.mcnemar_exact(before, after).p == 1.0  # balanced: capped at 1
    # a large table stays exact (integer arithmetic) and tiny
    before, after = paired_table(0, 0, 400, 0)
    assert stats.mcnemar_exact(before, after).p == pytest.approx(2 / 2 ** 400, rel=1e-12)
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True], [True, False])


def test_binomial_two_sided_matches_the_sum_of_terms():
    for n in range(0, 12):
        for k in range(n + 1):
            low = min(k, n - k)
            expected = min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n) if n else 1.0
            assert stats.binomial_two_sided(k, n) == expected


def test_sign_flip_exact_cases():
    # d = (1, 1, 1): 8 sign patterns, |sum| >= 3 for +++ and --- only
    assert stats.sign_flip_test([1, 1, 1]).p == 0.25
    # d = (2, -1): |sum| over the 4 patterns is 1, 3, 3, 1: all >= 1
    assert stats.sign_flip_test([2, -1, 0, 0]).p == 1.0
    result = stats.sign_flip_test([0.0, 0.0])
    assert (result.p, result.nonzero, result.exact) == (1.0, 0, True)
    # floats that sum to the observed value in another order still count as ties
    assert stats.sign_flip_test([0.1, 0.2, 0.3]).p == 0.25


def test_sign_flip_on_binary_differences_equals_exact_mcnemar():
    before, after = paired_table(both=3, only_before=2, only_after=7, neither=4)
    differences = [float(a) - float(b) for b, a in zip(before, after)]
    assert stats.sign_flip_test(differences).p == pytest.approx(stats.mcnemar_exact(before, after).p, abs=1e-12)


def test_sign_flip_monte_carlo_is_seeded_and_close_to_the_exact_answer():
    before, after = paired_table(both=10, only_before=8, only_after=16, neither=10)  # 24 discordant: Monte Carlo
    differences = [float(a) - float(b) for b, a in zip(before, after)]
    first = stats.sign_flip_test(differences, resamples=4000, seed=3)
    assert not first.exact and first.nonzero == 24
    assert stats.sign_flip_test(differences, resamples=4000, seed=3) == first
    exact = stats.mcnemar_exact(before, after).p  # the same null distribution, counted exactly
    assert first.p == pytest.approx(exact, abs=0.03)
    assert stats.sign_flip_test([1.0] * 30, resamples=2000).p == 1 / 2001  # never 0


def test_degenerate_paired_columns_give_the_interval_zero_zero():
    values = [True, False, True, True, False]
    d = stats.paired_difference([float(v) for v in values], [float(v) for v in values], resamples=2000, seed=1)
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.spans_zero
    assert stats.mcnemar_exact(values, values).p == 1.0
    same = stats.bootstrap_mean([0.7] * 40, resamples=2000)
    assert same.low == pytest.approx(0.7) and same.high == pytest.approx(0.7)


def test_bootstrap_is_reproducible_with_a_seed_and_close_across_seeds():
    rng = np.random.default_rng(0)
    before = (rng.random(300) < 0.4).astype(float)
    after = (rng.random(300) < 0.5).astype(float)
    first = stats.paired_difference(before, after, resamples=3000, seed=7)
    assert stats.paired_difference(before, after, resamples=3000, seed=7) == first  # bit for bit
    other = stats.paired_difference(before, after, resamples=3000, seed=8)
    assert other != first and other.value == first.value
    assert abs(other.low - first.low) < 0.01 and abs(other.high - first.high) < 0.01
    assert first.low < first.value < first.high and first.n == 300


def test_bootstrap_interval_of_a_mean_has_the_textbook_width():
    values = np.r_[np.ones(200), np.zeros(200)]  # p = 0.5, n = 400: normal interval +-1.96 * 0.025 = +-0.049
    estimate = stats.bootstrap_mean(values, resamples=4000, seed=0)
    assert estimate.value == 0.5
    assert estimate.low == pytest.approx(0.451, abs=0.008) and estimate.high == pytest.approx(0.549, abs=0.008)


def test_ratio_of_sums_is_resampled_by_item():
    nll, tokens = [10.0, 2.0, 30.0], [5, 1, 10]  # per-example loss 2, 2, 3
    estimate = stats.bootstrap_ratio(nll, tokens, resamples=4000, seed=0)
    assert estimate.value == pytest.approx(42 / 16)
    assert 2.0 <= estimate.low < estimate.value < estimate.high <= 3.0  # never outside the per-example losses
    assert stats.bootstrap_ratio([], []).value is None


def test_percentile_bootstrap_covers_the_truth_about_95_percent_of_the_time():
    """Coverage sanity: paired Bernoulli columns with a known difference of the means."""
    rng = np.random.default_rng(123)
    truth, hits, trials = 0.1, 0, 120
    for trial in range(trials):
        before = (rng.random(120) < 0.4).astype(float)
        after = (rng.random(120) < 0.5).astype(float)
        d = stats.paired_difference(before, after, resamples=1000, seed=trial)
        hits += d.low <= truth <= d.high
    assert 0.88 <= hits / trials <= 0.99


def test_the_wording_rule_needs_both_the_interval_and_the_p_value():
    clear = stats.Estimate(3.0, 1.0, 5.0, 100)
    assert stats.is_real_change(clear, 0.01)
    assert not stats.is_real_change(clear, 0.06)  # p too large
    assert not stats.is_real_change(stats.Estimate(3.0, -1.0, 5.0, 100), 0.01)  # interval spans 0
    assert not stats.is_real_change(stats.Estimate(None, None, None, 0), None)


def test_method_records_resamples_and_seed():
    method = stats.method(5000, 9)
    assert method["resamples"] == 5000 and method["seed"] == 9 and "percentile bootstrap" in method["interval"]


def test_several_statistics_share_one_set_of_draws():
    rng = np.random.default_rng(4)
    num, den = rng.random((50, 3)), rng.integers(1, 5, size=(50, 3)).astype(float)
    together = stats.bootstrap_ratios(num, den, resamples=2000, seed=2)
    for j in range(3):  # the draws depend on (items, resamples, seed) only, not on the other columns
        alone = stats.bootstrap_ratio(num[:, j], den[:, j], resamples=2000, seed=2)
        assert (together[j].low, together[j].high) == pytest.approx((alone.low, alone.high), rel=1e-12)
    after = num + 0.1
    differences = stats.paired_differences(num, after, den, resamples=2000, seed=2)
    for j in range(3):
        alone = stats.paired_difference(num[:, j], after[:, j], den[:, j], resamples=2000, seed=2)
        assert differences[j].value == pytest.approx(alone.value) and differences[j].low == pytest.approx(alone.low, rel=1e-9)
    assert stats.bootstrap_ratios([[1.0, 1.0]], [[1.0, 0.0]])[1].value is None  # no denominator: no estimate
