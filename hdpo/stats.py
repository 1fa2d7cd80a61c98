"""Uncertainty for the report: intervals, paired differences and their p-values for a crossed design of seeds
and problems, the power of such a design, and the number of decimals an interval justifies. Pure functions
(numpy in, numbers out), no I/O.

Data layout: a score matrix `values[s, p]` = one run's score on problem p (e.g. the unbiased pass@k of that
problem from its n samples, or the greedy reward) for seed s. Two methods are *paired* when their matrices
share seeds and problems: the same validation problems under the same seed.

The model. Every seed scores the same problems, so the design is crossed:
    x[s, p] = mu + a_s + b_p + e_sp,   a ~ (0, var_seed), b ~ (0, var_problem), e ~ (0, var_residual)
(for a paired difference: a_s = how much this seed's pair of runs differs, b_p = how much more the method
solves problem p whatever the seed, e_sp = the rest, sampling noise of the n samples included). The grand mean
then has variance var_seed / S + var_problem / P + var_residual / (S P). Both the interval and the p-value
come from this one estimate: the two-way ANOVA mean squares give the components (method of moments, each
truncated at 0), their sum the variance of the mean, and Satterthwaite's approximation its degrees of freedom,
(capped at S - 1) its degrees of freedom, so interval = estimate +- t(df) se and p = the two-sided t-test of
the same estimate; the p-value is below alpha exactly when the (1 - alpha) interval excludes 0. With 2 or 3
seeds the interval is as wide as two or three runs warrant.

With one seed the seed variance is not identifiable (nothing varies across seeds): the interval and p-value
then count problems only, which answers "is this pair of runs different on this problem distribution", not
"is the method different". `Interval.seeds_counted` says which; the report marks such intervals.
Calibration of both, by simulation from a two-level model with known truth: hdpo.calibration and
scripts/calibrate_stats.py.

The two-level bootstrap and the sign-flip test below are the previous method (the bootstrap undercovers with
2-5 seeds: a resample of 3 seeds has at most 10 distinct compositions, and its variance is (S-1)/S of the
truth; the sign-flip over per-problem means ignores the seed variance altogether), kept so the calibration
can show what they do.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

PROBLEMS_ONLY = "problems only; seed variance not estimable from one seed"
PROBLEMS_AND_SEEDS = "problems and seeds"


@dataclass(frozen=True)
class Components:
    """Variance components of a [seeds, problems] matrix (method of moments, each >= 0). With one seed `seed`
    and `residual` are NaN and `problem` holds problem + residual (they cannot be told apart)."""
    seed: float
    problem: float
    residual: float
    n_seeds: int
    n_problems: int

    @property
    def seeds_counted(self) -> bool:
        return self.n_seeds > 1


@dataclass(frozen=True)
class Interval:
    """A point estimate with a (1 - alpha) interval; for differences the p-value of the same t statistic.
    `seeds_counted`: False when one seed made the seed variance unestimable (problems only)."""
    estimate: float
    low: float
    high: float
    n_problems: int
    n_seeds: int = 1
    p_value: float = math.nan
    se: float = math.nan
    df: float = math.nan
    components: Optional[Components] = None

    @property
    def seeds_counted(self) -> bool:
        return self.n_seeds > 1

    @property
    def scope(self) -> str:
        return PROBLEMS_AND_SEEDS if self.seeds_counted else PROBLEMS_ONLY


def _matrix(values) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a [seeds, problems] matrix with at least one entry, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("scores must be finite (a missing problem must be dropped from every paired run)")
    return arr


# --- Student's t, from the regularized incomplete beta function (no scipy in the environment) ------------------

def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b), elementwise: the continued fraction of Numerical Recipes (6.4) by
    modified Lentz, on the side of the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where it converges fast."""
    a, b, x = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(a, b, x))
    flip = x > (a + 1) / (a + b + 2)
    a, b, x = np.where(flip, b, a), np.where(flip, a, b), np.where(flip, 1 - x, x)
    lgamma = np.vectorize(math.lgamma, otypes=[float])
    with np.errstate(divide="ignore"):
        log_front = a * np.log(x) + b * np.log1p(-x) - (lgamma(a) + lgamma(b) - lgamma(a + b))
    tiny = 1e-300
    c, d = np.ones_like(x), 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, 100000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            step = c * d
            h = h * step
        if np.all(np.abs(step - 1) < 1e-15):
            break
    out = np.where(x <= 0, 0.0, np.exp(log_front) * h / a)
    return np.where(flip, 1 - out, out)


def t_sf(t, df) -> np.ndarray:
    """P(T > t) for Student's t with `df` (> 0, may be fractional) degrees of freedom; df = inf: the normal."""
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    finite = np.isfinite(df)
    valid = ~(df <= 0) & ~np.isnan(df) & ~np.isnan(t)  # no degrees of freedom (nothing varies): undefined
    safe_df = np.where(finite & valid, df, 1.0)
    safe_t = np.where(valid, t, 0.0)
    tail = 0.5 * _betainc(safe_df / 2, 0.5, safe_df / (safe_df + safe_t ** 2))
    normal = 0.5 * np.vectorize(math.erfc, otypes=[float])(safe_t / math.sqrt(2))
    upper = np.where(safe_t >= 0, tail, 1 - tail)
    return np.where(valid, np.where(finite, upper, normal), np.nan)


def _t_pdf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    lgamma = np.vectorize(math.lgamma, otypes=[float])
    finite = np.isfinite(df)
    d = np.where(finite, df, 1.0)
    log_t = lgamma((d + 1) / 2) - lgamma(d / 2) - 0.5 * np.log(d * math.pi) - (d + 1) / 2 * np.log1p(t * t / d)
    return np.where(finite, np.exp(log_t), np.exp(-t * t / 2) / math.sqrt(2 * math.pi))


def t_quantile(q: float, df) -> np.ndarray:
    """The q-quantile (q in (0.5, 1)) of Student's t with `df` degrees of freedom: Newton's method on t_sf,
    kept inside a shrinking bracket (a step that leaves it bisects instead), to 1e-12 relative."""
    df = np.asarray(df, dtype=float)
    if np.any(~(df > 0)):  # no degrees of freedom anywhere: no quantile (rather than a math domain error)
        out = np.full_like(df, np.nan)
        ok = df > 0
        if ok.any():
            out[ok] = t_quantile(q, df[ok])
        return out if out.ndim else out[()]
    lo, hi = np.zeros_like(df), np.full_like(df, 1e7)
    t = np.full_like(df, 2.0)
    for _ in range(200):
        excess = t_sf(t, df) - (1 - q)  # > 0: t is still below the quantile
        lo, hi = np.where(excess > 0, t, lo), np.where(excess > 0, hi, t)
        step = t + excess / np.maximum(_t_pdf(t, df), 1e-300)
        inside = (step > lo) & (step < hi)
        new = np.where(inside, step, np.where(lo > 0, np.sqrt(np.maximum(lo, 1e-12) * hi), hi / 2))
        if np.all(np.abs(new - t) <= 1e-12 * np.maximum(1.0, np.abs(t))):
            return new
        t = new
    return t


# --- the crossed design: variance components, the variance of the grand mean and its degrees of freedom -------

def _mean_squares(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-way ANOVA without replication of [..., S, P] matrices: the mean squares of seeds, problems and
    residual, each [...] (NaN where there are no degrees of freedom)."""
    S, P = arr.shape[-2:]
    grand = arr.mean(axis=(-2, -1), keepdims=True)
    seed_means, problem_means = arr.mean(axis=-1, keepdims=True), arr.mean(axis=-2, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        ms_seed = P * ((seed_means - grand) ** 2).sum(axis=(-2, -1)) / (S - 1) if S > 1 else np.nan
        ms_problem = S * ((problem_means - grand) ** 2).sum(axis=(-2, -1)) / (P - 1) if P > 1 else np.nan
        resid = arr - seed_means - problem_means + grand
        ms_resid = (resid ** 2).sum(axis=(-2, -1)) / ((S - 1) * (P - 1)) if S > 1 and P > 1 else np.nan
    shape = arr.shape[:-2]
    return tuple(np.broadcast_to(np.asarray(m, dtype=float), shape).copy() for m in (ms_seed, ms_problem, ms_resid))


def variance_components(values) -> Components:
    """Seed, problem and residual variance of a [seeds, problems] matrix: E[MS_seed] = resid + P seed,
    E[MS_problem] = resid + S problem, E[MS_resid] = resid, solved and truncated at 0."""
    arr = _matrix(values)
    S, P = arr.shape
    ms_s, ms_p, ms_r = (float(m) for m in _mean_squares(arr))
    if S == 1:
        return Components(math.nan, ms_p, math.nan, S, P)
    if P == 1:
        return Components(ms_s, math.nan, math.nan, S, P)
    return Components(max(0.0, (ms_s - ms_r) / P), max(0.0, (ms_p - ms_r) / S), ms_r, S, P)


def _mean_variance(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(variance of the grand mean, Satterthwaite degrees of freedom) of [..., S, P] matrices. The variance is a
    linear combination of the mean squares, sum c_i MS_i (a component truncated at 0 drops its pair of terms),
    and its df is (sum c_i MS_i)^2 / sum (c_i MS_i)^2 / df_i (Satterthwaite), between 1 and S - 1. The cap at
    S - 1, the seed term's own df: a seed mean square that is small by chance makes Satterthwaite's df large
    just when the variance is underestimated, and uncapped the test was liberal with few seeds (simulated:
    12% false positives at 2 seeds, 7% at 3 with a small seed variance; hdpo.calibration). Capped it errs the
    other way (wider, at most t(S - 1)) and equals Satterthwaite when the seed term dominates."""
    S, P = arr.shape[-2:]
    ms_s, ms_p, ms_r = _mean_squares(arr)
    if S == 1 or P == 1:  # one factor: the plain variance of the mean over the other
        ms, dof = (ms_p, P - 1) if S == 1 else (ms_s, S - 1)
        if dof == 0:
            return np.full(arr.shape[:-2], np.nan), np.full(arr.shape[:-2], np.nan)
        return ms / (S * P), np.full(arr.shape[:-2], float(dof))
    keep_s, keep_p = (ms_s > ms_r).astype(float), (ms_p > ms_r).astype(float)
    terms = [(ms_s * keep_s, S - 1), (ms_p * keep_p, P - 1), (ms_r * (1 - keep_s - keep_p), (S - 1) * (P - 1))]
    total = sum(c for c, _ in terms)
    denom = sum(c * c / dof for c, dof in terms)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = np.where(denom > 0, np.clip(total * total / denom, 1.0, S - 1), S - 1)
    return np.maximum(total, 0.0) / (S * P), df


def t_intervals(values: np.ndarray, alpha: float = 0.05) -> dict[str, np.ndarray]:
    """For [..., S, P] matrices: the grand mean, its (1 - alpha) t interval and the two-sided p-value of
    mean = 0, from one variance estimate; arrays of shape [...] (estimate, low, high, p, se, df). A matrix of
    equal cells has a zero-width interval (p = 1 at 0, else 0); one without degrees of freedom, NaN."""
    arr = np.asarray(values, dtype=float)
    est = arr.mean(axis=(-2, -1))
    var, df = _mean_variance(arr)
    se = np.sqrt(var)
    safe_df = np.where(np.isfinite(df), df, np.inf)
    safe_df = np.where(np.isnan(df), 1.0, safe_df)
    half = t_quantile(1 - alpha / 2, safe_df) * se
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(se > 0, np.minimum(1.0, 2 * t_sf(np.abs(est) / np.where(se > 0, se, 1.0), safe_df)),
                     np.where(est == 0, 1.0, 0.0))
    p = np.where(np.isnan(se), np.nan, p)
    return {"estimate": est, "low": est - half, "high": est + half, "p": p, "se": se, "df": df}


def _t_interval(arr: np.ndarray, alpha: float, bounds: Optional[tuple[float, float]]) -> Interval:
    """`t_intervals` of one [S, P] matrix as an Interval, clipped to `bounds`."""
    S, P = arr.shape
    r = {k: float(v) for k, v in t_intervals(arr, alpha).items()}
    low, high = r["low"], r["high"]
    if bounds is not None and math.isfinite(low):
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(r["estimate"], low, high, P, S, r["p"], r["se"], r["df"], variance_components(arr))


def mean_interval(values, alpha: float = 0.05, bounds: Optional[tuple[float, float]] = None) -> Interval:
    """Grand mean of a [seeds, problems] matrix with its (1 - alpha) t interval, seeds and problems random
    (problems only with one seed). `bounds`: the range the mean can take (e.g. (0, 1) for a rate), the
    interval is clipped to it."""
    return _t_interval(_matrix(values), alpha, bounds)


def paired_difference(method, baseline, alpha: float = 0.05) -> Interval:
    """method - baseline on the same [seeds, problems]: the mean difference, its (1 - alpha) t interval and the
    two-sided p-value of no difference, both from the crossed model's variance (module docstring)."""
    a, b = _matrix(method), _matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired runs must share seeds and problems: shapes {a.shape} and {b.shape}")
    return _t_interval(a - b, alpha, None)


# --- power of a design, from measured components ------------------------------------------------------------

def design_variance(c: Components, n_seeds: int, n_problems: int) -> tuple[float, float]:
    """(variance of the grand mean, its expected Satterthwaite df, capped at S - 1 as in the analysis) for a design of n_seeds x n_problems with
    the components `c` (one-seed components: seed variance taken as 0 and problem + residual as residual,
    the smallest variance they allow)."""
    S, P = n_seeds, n_problems
    seed, problem, resid = ((0.0, 0.0, c.problem) if not c.seeds_counted else (c.seed, c.problem, c.residual))
    var = seed / S + problem / P + resid / (S * P)
    if S == 1:
        return var, float(P - 1)
    ems = [(resid + P * seed, S - 1), (resid + S * problem, P - 1), (-resid, (S - 1) * (P - 1))]
    denom = sum(m * m / dof for m, dof in ems)
    total = var * S * P
    return var, min(float(S - 1), max(1.0, total * total / denom)) if denom > 0 else float(S - 1)


def power(effect: float, c: Components, n_seeds: int, n_problems: int, alpha: float = 0.05) -> float:
    """Probability that the two-sided t-test at `alpha` rejects "no difference" when the true difference is
    `effect` (the shifted-t approximation of the noncentral t)."""
    var, df = design_variance(c, n_seeds, n_problems)
    if not var > 0:
        return 1.0 if effect != 0 else alpha
    crit = float(t_quantile(1 - alpha / 2, df))
    shift = abs(effect) / math.sqrt(var)
    return float(t_sf(crit - shift, df) + t_sf(crit + shift, df))


def seeds_for_power(effect: float, c: Components, n_problems: int, target: float = 0.8, alpha: float = 0.05,
                    max_seeds: int = 1000) -> Optional[int]:
    """The fewest seeds (>= 2: one seed cannot measure the seed variance) that reach `target` power for
    `effect` on n_problems; None when even max_seeds do not (the problem term alone is too large)."""
    if effect == 0:
        return None
    for s in range(2, max_seeds + 1):
        if power(effect, c, s, n_problems, alpha) >= target:
            return s
    return None


def minimum_detectable_effect(c: Components, n_seeds: int, n_problems: int, target: float = 0.8,
                              alpha: float = 0.05) -> float:
    """The smallest true difference the design detects with `target` power at `alpha` (two-sided):
    (t_{1-alpha/2} + t_{target}) se, with df from the design."""
    var, df = design_variance(c, n_seeds, n_problems)
    return float((t_quantile(1 - alpha / 2, df) + t_quantile(target, df)) * math.sqrt(var))


# --- equivalence ("keeps pass@1"): power and the smallest margin a design can show ---------------------------

def equivalence_power(effect: float, margin: float, c: Components, n_seeds: int, n_problems: int,
                      alpha: float = 0.05) -> float:
    """Probability that the (1 - alpha) interval lies inside (-margin, +margin) when the true difference is
    `effect`: the estimate must fall in (-margin + t se, margin - t se), a window that closes when the interval
    is wider than the margin (shifted-t approximation, as `power`)."""
    var, df = design_variance(c, n_seeds, n_problems)
    if not var > 0:
        return 1.0 if abs(effect) < margin else 0.0
    se = math.sqrt(var)
    crit = float(t_quantile(1 - alpha / 2, df))
    lower, upper = (-margin + crit * se - effect) / se, (margin - crit * se - effect) / se
    if upper <= lower:
        return 0.0
    return float(t_sf(lower, df) - t_sf(upper, df))


def seeds_for_equivalence(effect: float, margin: float, c: Components, n_problems: int, target: float = 0.8,
                          alpha: float = 0.05, max_seeds: int = 1000) -> Optional[int]:
    """The fewest seeds (>= 2) whose interval falls inside +-margin with `target` probability when the true
    difference is `effect`; None when max_seeds do not (or |effect| >= margin: then no design can)."""
    if abs(effect) >= margin:
        return None
    for s in range(2, max_seeds + 1):
        if equivalence_power(effect, margin, c, s, n_problems, alpha) >= target:
            return s
    return None


def minimum_equivalence_margin(c: Components, n_seeds: int, n_problems: int, target: float = 0.8,
                               alpha: float = 0.05) -> float:
    """The narrowest margin the design shows equivalence within, with `target` power, when the true difference
    is 0: the interval's half-width t_{1-alpha/2} se plus the estimate's own spread, which must stay inside the
    rest with probability `target` on both sides: (t_{1-alpha/2} + t_{(1+target)/2}) se."""
    var, df = design_variance(c, n_seeds, n_problems)
    return float((t_quantile(1 - alpha / 2, df) + t_quantile((1 + target) / 2, df)) * math.sqrt(var))


# --- verdicts on a claim, from one interval ------------------------------------------------------------------

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED = "supported", "contradicted", "inconclusive", "not tested"


def claim_verdict(low: float, high: float, direction: int, claimed: tuple[float, float] = (math.nan, math.nan),
                  margin: float = math.nan) -> tuple[str, str]:
    """(verdict, reason) of a claim about a difference, from its interval [low, high].

    direction +1 / -1 ("raises" / "lowers" by a size in `claimed` = (a, b), on that side of 0):
      contradicted  the interval lies on the wrong side of 0, or excludes the claimed range [a, b] (it is
                    entirely below a or entirely above b: the paper's size is ruled out either way)
      supported     otherwise, if the interval lies on the claimed side of 0 (so it also overlaps [a, b])
      inconclusive  otherwise: it holds 0 and some of [a, b]
    direction 0 ("keeps": |difference| < margin, an equivalence claim):
      supported     the interval lies inside (-margin, +margin)
      contradicted  the interval lies outside it (low >= margin or high <= -margin)
      inconclusive  otherwise: it straddles a margin
    A NaN interval (no paired runs): not tested. A zero-width interval (every paired difference the same, e.g.
    a handful of problems all scored alike) measures no noise, so it judges nothing: inconclusive."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return NOT_TESTED, "no paired runs"
    if low == high:
        return INCONCLUSIVE, "a zero-width interval: the paired differences do not vary, so no noise was measured"
    if direction == 0:
        if not margin > 0:
            raise ValueError("an equivalence claim needs a margin > 0")
        if -margin < low and high < margin:
            return SUPPORTED, "inside the margin"
        if low >= margin or high <= -margin:
            return CONTRADICTED, "outside the margin"
        return INCONCLUSIVE, "crosses the margin"
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1, -1 or 0, got {direction!r}")
    # mirror a "lowers" claim so that the claimed side is always positive
    lo, hi = (low, high) if direction > 0 else (-high, -low)
    a, b = sorted(direction * x for x in claimed)
    if not a > 0:
        raise ValueError(f"a directional claim's size must lie on its side of 0, got {claimed}")
    if hi < 0:
        return CONTRADICTED, "wrong side of 0"
    if hi < a:
        return CONTRADICTED, "smaller than the paper's"
    if lo > b:
        return CONTRADICTED, "same direction, larger than the paper's"
    if lo > 0:
        return SUPPORTED, "claimed side of 0, paper's size inside"
    return INCONCLUSIVE, "holds 0 and the paper's size"


# --- the previous method, kept for the calibration's comparison -----------------------------------------------

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


P_THRESHOLDS = (0.001, 0.01, 0.05)  # conventional levels a printed p must not be rounded across


def format_p(p: float) -> str:
    """Two significant digits (two decimals from 0.1 up), more when rounding would carry p across a
    conventional level: 0.0496 -> '0.0496', not '0.050' or '0.05'; below 0.001 '<0.001'."""
    if not math.isfinite(p):
        return "–"
    if p < 0.001:
        return "<0.001"
    if p >= 0.1:
        return f"{p:.2f}"
    for digits in range(2, 8):
        decimals = digits - 1 - math.floor(math.log10(p))
        text = f"{p:.{decimals}f}"
        if all((float(text) < t) == (p < t) for t in P_THRESHOLDS):
            return text
    return repr(p)
