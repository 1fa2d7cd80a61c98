"""hdpo.stats against exact enumerations and textbook values."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hdpo.stats import (Interval, bootstrap_means, decimals_for, format_interval, mean_interval, paired_difference,
                        sign_flip_p_value)


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
    iv = mean_interval(x, n_boot=20000, seed=0)
    assert iv.estimate == 0.5 and iv.n_problems == 400 and iv.n_seeds == 1
    assert iv.low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.004)
    assert iv.high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.004)


def test_seed_variance_enters_through_the_seed_resampling():
    # each seed is constant over problems, so all spread comes from the seeds: the bootstrap mean is
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, and the 95% interval is [0, 1]
    values = np.array([[0.0] * 50, [1.0] * 50])
    reps = bootstrap_means(values, n_boot=20000, seed=3)
    for v, p in ((0.0, 0.25), (0.5, 0.5), (1.0, 0.25)):
        assert (np.isclose(reps, v)).mean() == pytest.approx(p, abs=0.015)
    iv = mean_interval(values, seed=3)
    assert (iv.low, iv.high) == (0.0, 1.0) and iv.n_seeds == 2


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
    iv = paired_difference(method, baseline, seed=0)
    assert iv.estimate == pytest.approx(0.02)
    assert iv.low == pytest.approx(0.02) and iv.high == pytest.approx(0.02)
    assert iv.p_value < 0.001
    # unpaired, the two intervals overlap almost entirely: pairing is what makes 0.02 visible
    a, b = mean_interval(method), mean_interval(baseline)
    assert a.low < b.high
    # a method that is the baseline with the problems' labels shuffled has no paired effect
    null = paired_difference(baseline[:, ::-1], baseline, seed=0)
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
