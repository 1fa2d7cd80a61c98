"""Calibration of hdpo.stats by simulation (hdpo.calibration), at sizes that run in seconds: 200 problems,
n = 8 samples, seeds with run-to-run noise; 2000 simulated experiments per check. Tolerances are 3 Monte Carlo
standard errors of a rate over 2000 datasets, sqrt(0.95 * 0.05 / 2000) = 0.0049 for coverage and the same at
a 5% rejection rate: coverage in [0.935, 0.965] would be the goal; what is asserted is what a correct
procedure cannot miss by chance: coverage >= 0.95 - 0.015, false positives <= 0.05 + 0.015. The paper-size
numbers are in scripts/calibrate_stats.py's output (README)."""
from __future__ import annotations

import numpy as np
import pytest

from hdpo.calibration import Design, alternative, calibrate, pass_at_k_table, simulate, true_difference
from hdpo.stats import paired_difference

SMALL = Design(n_problems=200)
N = 2000
TOL = 3 * np.sqrt(0.95 * 0.05 / N)


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_intervals_cover_and_tests_hold_their_level_with_seed_variance(n_seeds):
    null = calibrate(SMALL, n_seeds, N, seed=n_seeds)
    assert null.truth == 0.0
    assert null.rejection <= 0.05 + TOL, null
    alt = alternative(SMALL)
    cov = calibrate(alt, n_seeds, N, seed=10 + n_seeds, truth=true_difference(alt, draws=1_000_000))
    assert cov.truth > 0.005  # a real difference to cover
    assert cov.coverage >= 0.95 - TOL, cov


def test_one_seed_counts_problems_only_and_says_so():
    """With run-to-run noise one seed cannot see it: the interval covers far less than 95% of the method's
    truth (the reason the report marks it 'problems only'); without that noise it is exact."""
    noisy = calibrate(SMALL, 1, N, seed=1)
    assert noisy.rejection > 0.05 + TOL
    quiet = calibrate(Design(n_problems=200, seed_sd=0.0), 1, N, seed=2)
    assert abs(quiet.rejection - 0.05) <= TOL
    a, b = simulate(SMALL, 1, 1, np.random.default_rng(0))
    assert not paired_difference(a[0], b[0]).seeds_counted


def test_the_simulated_scores_are_the_unbiased_pass_at_k():
    assert pass_at_k_table(8, 1).tolist() == [c / 8 for c in range(9)]
    assert pass_at_k_table(8, 8).tolist() == [0.0] + [1.0] * 8
    a, b = simulate(Design(n_problems=50, effect=5.0), 2, 3, np.random.default_rng(0))
    assert a.shape == b.shape == (3, 2, 50) and a.mean() > b.mean()
