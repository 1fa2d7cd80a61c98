"""Uncertainty for the report: bootstrap intervals over problems (and seeds), paired differences against a
baseline, a paired sign-flip test, and the number of decimals an interval justifies. Pure functions (numpy in,
numbers out), no I/O; every resampling takes an explicit seed so a report is reproducible.

Data layout: a score matrix `values[s, p]` = one run's score on problem p (e.g. the unbiased pass@k of that
problem from its n samples, or the greedy reward) for seed s. Two methods are *paired* when their matrices
share seeds and problems: the same validation problems under the same seed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (1 - alpha) interval, and for differences the paired test's p-value."""
    estimate: float
    low: float
    high: float
    n_problems: int
    n_seeds: int = 1
    p_value: float = math.nan


def _matrix(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a [seeds, problems] matrix with at least one entry, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("scores must be finite (a missing problem must be dropped from every paired run)")
    return arr


def bootstrap_means(values, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of the grand mean of a [seeds, problems] matrix: seeds resampled with replacement,
    then problems resampled with replacement (the same problem draw for every seed, so a paired difference
    matrix keeps its pairing). With one seed this is the ordinary bootstrap over problems."""
    arr = _matrix(values)
    S, P = arr.shape
    rng = np.random.default_rng(seed)
    # multinomial counts are the same draw as indices with replacement, without a [B, S, P] gather
    w_s = rng.multinomial(S, np.full(S, 1.0 / S), size=n_boot) if S > 1 else np.ones((n_boot, 1))
    w_p = rng.multinomial(P, np.full(P, 1.0 / P), size=n_boot)
    return np.einsum("bs,sp,bp->b", w_s, arr, w_p) / (S * P)


def percentile_interval(replicates: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    lo, hi = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def mean_interval(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Grand mean of a [seeds, problems] matrix with its percentile bootstrap interval."""
    arr = _matrix(values)
    lo, hi = percentile_interval(bootstrap_means(arr, n_boot, seed), alpha)
    return Interval(float(arr.mean()), lo, hi, arr.shape[1], arr.shape[0])


def sign_flip_p_value(differences, n_perm: int = 10000, seed: int = 0, exact_up_to: int = 16) -> float:
    """Two-sided paired randomisation test of mean(d) = 0: under the null each paired difference is as likely
    to have either sign. Exact (all 2^n sign patterns) for n <= exact_up_to, else Monte Carlo with the
    (1 + hits) / (1 + n_perm) correction, so p is never 0."""
    d = np.asarray(differences, dtype=float).ravel()
    if d.size == 0:
        raise ValueError("the paired test needs at least one difference")
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if d.size <= exact_up_to:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        stats = np.abs(signs @ d) / d.size
        return float((stats >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(n_perm, d.size))
    hits = int((np.abs(signs @ d) / d.size >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm)


def paired_difference(method, baseline, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                      n_perm: int = 10000) -> Interval:
    """method − baseline on the same [seeds, problems]: the mean difference, its paired bootstrap interval
    (seeds and problems resampled jointly for both), and the sign-flip p-value on the per-problem differences
    averaged over seeds."""
    a, b = _matrix(method), _matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired runs must share seeds and problems: shapes {a.shape} and {b.shape}")
    d = a - b
    lo, hi = percentile_interval(bootstrap_means(d, n_boot, seed), alpha)
    p = sign_flip_p_value(d.mean(axis=0), n_perm, seed)
    return Interval(float(d.mean()), lo, hi, d.shape[1], d.shape[0], p)


def decimals_for(low: float, high: float, lo_digits: int = 1, hi_digits: int = 4) -> int:
    """Decimals that show two significant digits of the interval's half-width (0.049 -> 3, 0.3 -> 2), within
    [lo_digits, hi_digits]; a zero-width interval (every problem scored the same) gets 2. So 4 problems never
    print 4 decimals."""
    half = (high - low) / 2
    if not math.isfinite(half) or half <= 0:
        return min(hi_digits, max(lo_digits, 2))
    return int(min(hi_digits, max(lo_digits, 1 - math.floor(math.log10(half)))))


def format_interval(iv: Interval, signed: bool = False, digits: int | None = None) -> str:
    """'0.62 [0.55, 0.69]' (or '+0.012 [-0.004, +0.028]' for a difference), decimals from the interval."""
    d = decimals_for(iv.low, iv.high) if digits is None else digits
    sign = "+" if signed else ""
    return f"{iv.estimate:{sign}.{d}f} [{iv.low:{sign}.{d}f}, {iv.high:{sign}.{d}f}]"


def format_p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"
