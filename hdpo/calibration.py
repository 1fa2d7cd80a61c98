"""Calibration of hdpo.stats by simulation: paired runs drawn from a two-level model with a known true
difference, analysed exactly as the report analyses real runs (`stats.t_intervals`, the code behind
`paired_difference`), counting how often the 95% interval holds the truth and how often the test rejects a
true null. Pure functions; scripts/calibrate_stats.py prints the numbers, tests/test_calibration.py asserts
them at small sizes.

The model, per dataset (one replication of a whole experiment: two methods x S seeds on P problems):
  problem p:            difficulty z_p ~ N(difficulty_mean, difficulty_sd^2) (log-odds of a correct sample)
                        and the method's gain there g_p ~ N(effect, effect_sd^2)
  run (method m, seed s): u_ms ~ N(0, seed_sd^2), one shift for the whole run (training noise)
  run x problem:        w_msp ~ N(0, run_problem_sd^2) (what one trained model happens to get right)
  success probability   q_msp = sigmoid(z_p + [m = method] g_p + u_ms + w_msp)
  score                 the unbiased pass@k of c ~ Binomial(n_samples, q_msp) correct samples
Problems, runs and samples are all drawn afresh per dataset, so the truth is the population difference
E[(1 - q_baseline)^k - (1 - q_method)^k] (the expectation of the unbiased pass@k is 1 - (1 - q)^k), exactly 0
when effect = effect_sd = 0 (the two methods are then exchangeable), else computed by a large Monte Carlo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from hdpo.stats import t_intervals


@dataclass(frozen=True)
class Design:
    """A two-level model and the size of one experiment. The defaults resemble the paper's validation
    (2048 problems, n = 8, mean pass@1 about 0.64; pass@8 about 0.88, the paper's 0.82) with run-to-run noise
    of about one point of pass@1 per run (seed_sd 0.1 in log-odds: a run's mean pass@1 varies with sd 0.011
    across seeds), a usual size for RL fine-tuning of a 1.5B model; the paper gives no seed spread."""
    n_problems: int = 2048
    n_samples: int = 8
    k: int = 1
    difficulty_mean: float = 1.3
    difficulty_sd: float = 3.0
    seed_sd: float = 0.1
    run_problem_sd: float = 0.5
    effect: float = 0.0
    effect_sd: float = 0.0

    @property
    def null(self) -> bool:
        return self.effect == 0 and self.effect_sd == 0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))  # overflow-free


def pass_at_k_table(n: int, k: int) -> np.ndarray:
    """The unbiased pass@k of c correct out of n, for c = 0..n: 1 - C(n - c, k) / C(n, k)."""
    return np.array([1 - math.comb(n - c, k) / math.comb(n, k) for c in range(n + 1)])


def simulate(design: Design, n_seeds: int, n_datasets: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """(method, baseline) pass@k scores, each [n_datasets, n_seeds, n_problems]."""
    N, S, P = n_datasets, n_seeds, design.n_problems
    z = rng.normal(design.difficulty_mean, design.difficulty_sd, (N, 1, P))
    gain = rng.normal(design.effect, design.effect_sd, (N, 1, P))
    table = pass_at_k_table(design.n_samples, design.k)

    def runs(shift: np.ndarray) -> np.ndarray:
        u = rng.normal(0, design.seed_sd, (N, S, 1))
        w = rng.normal(0, design.run_problem_sd, (N, S, P))
        return table[rng.binomial(design.n_samples, _sigmoid(z + shift + u + w))]

    return runs(gain), runs(np.zeros_like(gain))


def true_difference(design: Design, draws: int = 4_000_000, seed: int = 12345) -> float:
    """The population difference method - baseline of the expected pass@k (0 exactly under the null)."""
    if design.null:
        return 0.0
    rng = np.random.default_rng(seed)
    total, chunk = 0.0, 500_000
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        z = rng.normal(design.difficulty_mean, design.difficulty_sd, m)
        gain = rng.normal(design.effect, design.effect_sd, m)
        noise = lambda: rng.normal(0, design.seed_sd, m) + rng.normal(0, design.run_problem_sd, m)  # noqa: E731
        q_method, q_base = _sigmoid(z + gain + noise()), _sigmoid(z + noise())
        total += float(((1 - q_base) ** design.k - (1 - q_method) ** design.k).sum())
    return total / draws


@dataclass(frozen=True)
class Calibration:
    """What N simulated experiments gave: the share of 95% intervals holding the truth, the share of tests
    rejecting at alpha (under the null: the false-positive rate), each with its Monte Carlo standard error,
    and the mean interval width."""
    n_seeds: int
    n_datasets: int
    truth: float
    coverage: float
    rejection: float
    mean_width: float

    @property
    def coverage_se(self) -> float:
        return math.sqrt(self.coverage * (1 - self.coverage) / self.n_datasets)

    @property
    def rejection_se(self) -> float:
        return math.sqrt(max(self.rejection, 1e-12) * (1 - self.rejection) / self.n_datasets)


def calibrate(design: Design, n_seeds: int, n_datasets: int, seed: int = 0, alpha: float = 0.05,
              truth: float | None = None, chunk: int = 250) -> Calibration:
    """Simulate n_datasets experiments of `design` with n_seeds seeds and analyse each with stats.t_intervals."""
    rng = np.random.default_rng(seed)
    truth = true_difference(design) if truth is None else truth
    covered = rejected = 0
    width = 0.0
    for start in range(0, n_datasets, chunk):
        method, baseline = simulate(design, n_seeds, min(chunk, n_datasets - start), rng)
        r = t_intervals(method - baseline, alpha)
        covered += int(((r["low"] <= truth) & (truth <= r["high"])).sum())
        rejected += int((r["p"] < alpha).sum())
        width += float((r["high"] - r["low"]).sum())
    return Calibration(n_seeds, n_datasets, truth, covered / n_datasets, rejected / n_datasets, width / n_datasets)


def calibrate_previous(design: Design, n_seeds: int, n_datasets: int, seed: int = 0, alpha: float = 0.05,
                       truth: float | None = None, n_boot: int = 1000, n_perm: int = 1000) -> Calibration:
    """The same, analysed with the previous method: the two-level percentile bootstrap interval and the
    sign-flip test over per-problem means (stats.bootstrap_means, stats.sign_flip_p_value)."""
    from hdpo.stats import bootstrap_means, percentile_interval, sign_flip_p_value

    rng = np.random.default_rng(seed)
    truth = true_difference(design) if truth is None else truth
    covered = rejected = 0
    width = 0.0
    for i in range(n_datasets):
        method, baseline = simulate(design, n_seeds, 1, rng)
        d = (method - baseline)[0]
        low, high = percentile_interval(bootstrap_means(d, n_boot, seed=i), alpha)
        covered += int(low <= truth <= high)
        rejected += int(sign_flip_p_value(d.mean(axis=0), n_perm, seed=i) < alpha)
        width += high - low
    return Calibration(n_seeds, n_datasets, truth, covered / n_datasets, rejected / n_datasets, width / n_datasets)


def alternative(design: Design, effect: float = 0.15, effect_sd: float = 0.3) -> Design:
    """The design with a method that gains `effect` log-odds on average, more on some problems than others."""
    return replace(design, effect=effect, effect_sd=effect_sd)
