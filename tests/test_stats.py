"""hdpo.stats against exact enumerations, textbook values and the crossed model it assumes."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hdpo.stats import (PROBLEMS_ONLY, Components, Interval, bootstrap_means, decimals_for, format_interval, format_p,
                        mean_interval, minimum_detectable_effect, paired_difference, power, seeds_for_power,
                        sign_flip_p_value, t_quantile, t_sf, variance_components)


def test_bootstrap_over_problems_matches_the_exact_bootstrap_distribution():
    x = np.array([0.0, 1.0, 1.0, 0.25])
    # exact: every one of the 4^4 equally likely resamples
    exact = np.array([x[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])
    reps = bootstrap_means(x, n_boot=40000, seed=1)
    assert reps.mean() == pytest.approx(exact.mean(), abs=0.005)
    assert reps.var() == pytest.approx(exact.var(), rel=0.03)
    # textbook: the bootstrap variance of a mean is the plug-in variance over n
    assert exact.var() == pytest.approx(x.var() / len(x))
    for v in np.unique(exact):
        assert (reps == v).mean() == pytest.approx((exact == v).mean(), abs=0.01)


def test_bernoulli_interval_matches_the_normal_approximation():
    x = np.array([1.0] * 200 + [0.0] * 200)  # p = 0.5, n = 400: standard error 0.025
    iv = mean_interval(x)
    assert iv.estimate == 0.5 and iv.n_problems == 400 and iv.n_seeds == 1
    # the t interval with the sample standard deviation (n - 1): 0.5 / sqrt(399) = 0.02503, t(399) = 1.9659
    assert iv.low == pytest.approx(0.5 - 1.9659 * 0.5 / math.sqrt(399), abs=1e-4)
    assert iv.high == pytest.approx(0.5 + 1.9659 * 0.5 / math.sqrt(399), abs=1e-4)
    assert iv.scope == PROBLEMS_ONLY and not iv.seeds_counted


def test_seed_variance_enters_through_the_seed_resampling():
    # each seed is constant over problems, so all spread comes from the seeds: the bootstrap mean is
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, and the 95% interval is [0, 1]
    values = np.array([[0.0] * 50, [1.0] * 50])
    reps = bootstrap_means(values, n_boot=20000, seed=3)
    for v, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert (np.isclose(reps, v)).mean() == pytest.approx(p, abs=0.015)
    # the t interval: all the spread is between 2 seeds, so se = 0.5 on 1 degree of freedom (t = 12.7); a rate
    # is clipped to [0, 1]
    iv = mean_interval(values, bounds=(0.0, 1.0))
    assert iv.se == pytest.approx(0.5) and iv.df == pytest.approx(1.0)
    assert (iv.low, iv.high) == (0.0, 1.0) and iv.n_seeds == 2 and iv.seeds_counted


def test_two_level_bootstrap_matches_the_exact_enumeration_with_one_problem_draw_for_all_seeds():
    """Seeds and problems both vary, with an interaction (which problem is easy depends on the seed): every one
    of the 2^2 seed draws x 3^3 problem draws is equally likely, the same problem draw serving every seed.
    Drawing problems afresh per seed would give another distribution (checked: it is told apart here)."""
    arr = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0]])
    exact = np.array([arr[np.ix_(list(s), list(p))].mean()
                      for s in itertools.product(range(2), repeat=2) for p in itertools.product(range(3), repeat=3)])
    per_seed = np.array([np.mean([arr[a, list(pa)].mean(), arr[b, list(pb)].mean()])  # a per-seed problem draw
                         for a, b in itertools.product(range(2), repeat=2)
                         for pa in itertools.product(range(3), repeat=3) for pb in itertools.product(range(3), repeat=3)])
    reps = bootstrap_means(arr, n_boot=100000, seed=5)
    values = np.unique(np.round(np.concatenate([exact, per_seed]), 9))
    freq = lambda x: np.array([np.isclose(x, v).mean() for v in values])  # noqa: E731
    got, want, other = freq(reps), freq(exact), freq(per_seed)
    assert np.abs(got - want).max() < 0.006
    assert np.abs(other - want).max() > 0.02  # the test can tell the two schemes apart
    assert reps.var() == pytest.approx(exact.var(), rel=0.03)


def test_sign_flip_p_value_is_the_exact_enumeration():
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.4, -0.05])
    brute = np.mean([abs(np.dot(s, d)) / len(d) >= abs(d.mean()) - 1e-12
                     for s in itertools.product((1, -1), repeat=len(d))])
    assert sign_flip_p_value(d) == pytest.approx(brute)
    # all differences of one sign and equal size: only the two all-same patterns reach |mean| -> 2 / 2^n
    assert sign_flip_p_value([0.1] * 5) == pytest.approx(2 / 32)
    # no difference at all: every pattern reaches 0 -> p = 1
    assert sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0
    # Monte Carlo agrees with the exact test where both apply
    mc = sign_flip_p_value(d, n_perm=40000, exact_up_to=0, seed=2)
    assert mc == pytest.approx(brute, abs=0.01)


def test_paired_difference_removes_the_shared_problem_difficulty():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0, 1, size=(2, 300))  # problems differ a lot in difficulty
    method = baseline + 0.02  # uniformly a little better on every problem and seed
    iv = paired_difference(method, baseline)
    assert iv.estimate == pytest.approx(0.02)
    assert iv.low == pytest.approx(0.02) and iv.high == pytest.approx(0.02)
    assert iv.p_value < 0.001
    # unpaired, the two intervals overlap almost entirely: pairing is what makes 0.02 visible
    a, b = mean_interval(method), mean_interval(baseline)
    assert a.low < b.high
    # a method that is the baseline with the problems' labels shuffled has no paired effect
    null = paired_difference(baseline[:, ::-1], baseline)
    assert null.low < 0 < null.high and null.p_value > 0.05


def test_paired_difference_needs_the_same_problems():
    with pytest.raises(ValueError, match="share seeds and problems"):
        paired_difference(np.zeros((1, 3)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="finite"):
        mean_interval([0.5, math.nan])


def test_precision_follows_the_interval():
    assert decimals_for(0.451, 0.549) == 3  # half-width 0.049
    assert decimals_for(0.0, 0.6) == 2  # four problems: half-width 0.3
    assert decimals_for(0.5, 0.5) == 2 and decimals_for(0.0, 0.0004) == 4
    assert format_interval(Interval(0.25, 0.0, 0.75, 4)) == "0.25 [0.00, 0.75]"
    assert format_interval(Interval(0.012, -0.004, 0.028, 2048), signed=True) == "+0.012 [-0.004, +0.028]"


def test_t_distribution_matches_textbook_quantiles():
    for df, q975 in ((1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423), (math.inf, 1.9600)):
        assert float(t_quantile(0.975, df)) == pytest.approx(q975, abs=1e-4)
    assert float(t_quantile(0.8, 10)) == pytest.approx(0.8791, abs=1e-4)
    assert float(t_sf(0.0, 3)) == pytest.approx(0.5)
    assert float(t_sf(-2.0, 7)) == pytest.approx(1 - float(t_sf(2.0, 7)))
    assert float(t_sf(1.0, 1)) == pytest.approx(0.25)  # Cauchy: 1/2 - atan(1)/pi


def test_variance_components_recover_a_crossed_model():
    rng = np.random.default_rng(0)
    S, P = 200, 2000
    x = 0.3 + rng.normal(0, 0.02, (S, 1)) + rng.normal(0, 0.1, (1, P)) + rng.normal(0, 0.3, (S, P))
    c = variance_components(x)
    # tolerances: 3 standard errors of each estimate, e.g. the seed variance's relative se is about sqrt(2 / 199)
    assert c.seed == pytest.approx(0.02 ** 2, rel=0.3)
    assert c.problem == pytest.approx(0.1 ** 2, rel=0.1)
    assert c.residual == pytest.approx(0.3 ** 2, rel=0.01)
    one = variance_components(x[:1])
    assert math.isnan(one.seed) and math.isnan(one.residual) and not one.seeds_counted


def test_the_p_value_counts_the_seeds_and_agrees_with_the_interval():
    """Issue 24's example: 3 seeds x 500 problems whose seeds disagree. The sign-flip test over per-problem
    means called this p = 1e-4 beside an interval holding 0; the seeds' spread is most of the uncertainty."""
    rng = np.random.default_rng(0)
    d = np.array([0.04, 0.03, -0.05])[:, None] + rng.normal(0, 0.05, (3, 500))
    iv = paired_difference(d, np.zeros_like(d))
    assert iv.low < 0 < iv.high and iv.p_value > 0.5
    assert iv.df == pytest.approx(2.0, abs=0.05)  # the seeds' 2 degrees of freedom dominate
    # on any matrix: p < alpha exactly when the (1 - alpha) interval excludes 0
    for trial in range(200):
        S, P = int(rng.integers(1, 6)), int(rng.integers(2, 60))
        x = rng.normal(0, 1, (S, 1)) * rng.uniform(0, 0.1) + rng.normal(rng.uniform(-0.2, 0.2), 0.5, (S, P))
        iv = paired_difference(x, np.zeros_like(x))
        excludes = iv.low > 0 or iv.high < 0
        assert (iv.p_value < 0.05) == excludes, (trial, iv)


def test_format_p_never_rounds_across_a_conventional_level():
    assert format_p(0.0496) == "0.0496"  # "0.05" read as not significant at 0.05
    assert format_p(0.00996) == "0.00996" and format_p(0.0012) == "0.0012"
    assert format_p(0.023) == "0.023" and format_p(0.4449) == "0.44" and format_p(0.0004) == "<0.001"
    assert format_p(0.05) == "0.050" and format_p(math.nan) == "–"


def test_power_and_the_seeds_a_difference_needs():
    c = Components(seed=0.01 ** 2, problem=0.05 ** 2, residual=0.3 ** 2, n_seeds=3, n_problems=2048)
    assert power(0.0, c, 5, 2048) == pytest.approx(0.05, abs=1e-9)  # under the null: the level
    mde = minimum_detectable_effect(c, 5, 2048)
    assert power(mde, c, 5, 2048) == pytest.approx(0.8, abs=0.02)
    n = seeds_for_power(0.015, c, 2048)
    assert power(0.015, c, n, 2048) >= 0.8 > power(0.015, c, n - 1, 2048)
    # more problems cannot remove the seed term: a tiny effect needs many seeds, a hopeless one None
    assert seeds_for_power(0.001, c, 2048, max_seeds=50) is None
    # with one seed the seed variance is unknown: the count assumes none, a lower bound
    one = Components(math.nan, 0.3 ** 2, math.nan, 1, 2048)
    assert seeds_for_power(0.015, one, 2048) <= n
