"""The claims table (issue 24, items 3-4): the paper's claimed differences from its tables, the verdict rules,
the equivalence power, and claims_frame / claims.{csv,md} / the claims figure on constructed per-problem
records whose differences are known exactly."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pandas as pd
import pytest

from hdpo.config import from_dict, paper_methods
from hdpo.paper import EQUIVALENCE_MARGIN, PAPER_CLAIMS, PROSE_VS_TABLES, claim_differences, claim_effect, claim_range
from hdpo.passk import pass_at_k
from hdpo.report.frames import POWER_PROBLEMS, claims_frame
from hdpo.stats import (CONTRADICTED, INCONCLUSIVE, NOT_TESTED, PROBLEMS_ONLY, SUPPORTED, Components, claim_verdict,
                        equivalence_power, minimum_equivalence_margin, seeds_for_equivalence, seeds_for_power,
                        t_intervals, t_quantile, t_sf, variance_components, design_variance)

N, P, SEEDS, END = 8, 2000, (1, 2, 3, 4, 5), 40
METHODS = ["grpo", "hdpo_frozen_lambda0.1", "hdpo_frozen_lambda0.01", "hdpo_drifting_lambda0.1",
           "hdpo_drifting_lambda0.01"]


# --- the paper's numbers -------------------------------------------------------------------------------------

def test_claims_come_from_the_tables():
    by = {c.key: c for c in PAPER_CLAIMS}
    assert len(PAPER_CLAIMS) == 8  # 4 statements x 2 teachers
    c = by["frozen_lambda0.1_raises_pass@8"]
    assert claim_differences(c) == pytest.approx({"paper_h200": 0.8398 - 0.8228, "paper_h100": 0.8369 - 0.8223})
    assert claim_range(c) == pytest.approx((0.0146, 0.0170)) and claim_effect(c) == pytest.approx(0.0158)
    cost = by["drifting_lambda0.1_costs_pass@1"]
    assert claim_range(cost) == pytest.approx((0.6294 - 0.6519, 0.6343 - 0.6509))  # -2.25 .. -1.66 points
    assert cost.note == PROSE_VS_TABLES and "1.66-2.25" in PROSE_VS_TABLES
    # every stated direction holds in both tables, and "keeps" lies inside the margin there
    for claim in PAPER_CLAIMS:
        lo, hi = claim_range(claim)
        if claim.direction == 0:
            assert -EQUIVALENCE_MARGIN < lo <= hi < EQUIVALENCE_MARGIN
        else:
            assert claim.direction * lo > 0 and claim.direction * hi > 0


# --- the verdict rules -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high, verdict, reason", [
    (0.005, 0.030, SUPPORTED, "claimed side"),       # above 0, holds the paper's 1.46-1.70
    (0.016, 0.0161, SUPPORTED, "claimed side"),  # (a zero-width interval judges nothing)
    (-0.010, 0.030, INCONCLUSIVE, "holds 0"),
    (-0.030, -0.001, CONTRADICTED, "wrong side"),
    (-0.010, 0.010, CONTRADICTED, "smaller"),        # holds 0 but rules out the paper's size
    (0.020, 0.040, CONTRADICTED, "larger"),
])
def test_directional_verdicts(low, high, verdict, reason):
    got = claim_verdict(low, high, +1, (0.0146, 0.0170))
    assert got[0] == verdict and reason in got[1]
    # a "lowers" claim is the mirror image
    assert claim_verdict(-high, -low, -1, (-0.0170, -0.0146))[0] == verdict


@pytest.mark.parametrize("low, high, verdict", [
    (-0.004, 0.006, SUPPORTED), (-0.012, 0.003, INCONCLUSIVE), (0.010, 0.030, CONTRADICTED),
    (-0.05, -0.011, CONTRADICTED), (-0.02, 0.02, INCONCLUSIVE)])
def test_equivalence_verdicts(low, high, verdict):
    assert claim_verdict(low, high, 0, margin=0.01)[0] == verdict


def test_no_interval_is_not_tested_and_bad_claims_are_refused():
    assert claim_verdict(math.nan, math.nan, +1, (0.01, 0.02))[0] == NOT_TESTED
    with pytest.raises(ValueError):
        claim_verdict(0.0, 0.1, +1, (-0.01, 0.02))  # a "raises" claim whose size is not above 0
    with pytest.raises(ValueError):
        claim_verdict(0.0, 0.1, 0)  # equivalence without a margin


# --- equivalence power --------------------------------------------------------------------------------------------

def test_equivalence_power_by_hand_and_by_simulation():
    c = Components(seed=2e-5, problem=0.02, residual=0.03, n_seeds=3, n_problems=400)
    S, Pn, margin = 4, 400, 0.04
    se = math.sqrt(2e-5 / S + 0.02 / Pn + 0.03 / (S * Pn))
    assert design_variance(c, S, Pn)[0] == pytest.approx(se * se)
    df = design_variance(c, S, Pn)[1]
    # by hand, truth 0: the estimate must land within +-(margin - t se), so power = 1 - 2 P(T > w)
    w = (margin - float(t_quantile(0.975, df)) * se) / se
    got = equivalence_power(0.0, margin, c, S, Pn)
    assert got == pytest.approx(1 - 2 * float(t_sf(w, df)))
    assert 0.5 < got < 0.95
    # simulation: the two-level model, analysed by the report's own t interval, equivalence = inside the margin
    rng = np.random.default_rng(0)
    sims = 3000
    d = (rng.normal(0, math.sqrt(2e-5), (sims, S, 1)) + rng.normal(0, math.sqrt(0.02), (sims, 1, Pn))
         + rng.normal(0, math.sqrt(0.03), (sims, S, Pn)))
    r = t_intervals(d)
    inside = ((r["low"] > -margin) & (r["high"] < margin)).mean()
    assert inside == pytest.approx(got, abs=0.05)
    # the smallest margin: power 0.8 there when the truth is 0, and the seeds to reach a margin
    m = minimum_equivalence_margin(c, S, Pn)
    assert equivalence_power(0.0, m, c, S, Pn) == pytest.approx(0.8, abs=1e-6)
    need = seeds_for_equivalence(0.0, 0.03, c, Pn)
    assert equivalence_power(0.0, 0.03, c, need, Pn) >= 0.8 > equivalence_power(0.0, 0.03, c, need - 1, Pn)
    assert seeds_for_equivalence(0.0, 0.015, c, Pn) is None  # the problem term alone is too wide for it
    assert seeds_for_equivalence(0.02, 0.015, c, Pn) is None  # a true difference beyond the margin
    assert equivalence_power(0.0, 0.001, c, S, Pn) == 0.0  # an interval wider than the margin never fits


# --- claims_frame on constructed records ---------------------------------------------------------------------------

def _write(results, method, seed, counts):
    run = results / "runs" / f"{method}_seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    ids = [f"p{i:04d}" for i in range(P)]
    rows = [{"step": s, "num_samples": N, "ids": ids, "num_correct": [int(x) for x in c], "greedy": [0.0] * P}
            for s, c in ((0, counts), (END, counts))]
    with gzip.open(run / "val_problems.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """GRPO draws its counts per seed; each method edits a copy of them so its difference is known:
    frozen 0.1: the same 30 unsolved problems solved once (pass@8 +0.015 in every seed: supported);
    drifting 0.1: 20 solved problems lost (pass@8 -0.010: contradicted, the wrong side);
    frozen 0.01: counts moved +-1 on 5% of problems at random (pass@1 ~ 0, inside +-1 point: supported);
    drifting 0.01: per seed a shift of pass@1 by +1.2, -1.2, +1.2, -1.2, +0.6 points (crosses the margin:
    inconclusive)."""
    results = tmp_path_factory.mktemp("claims") / "results"
    rng = np.random.default_rng(1)
    base_p = rng.beta(2, 1.2, P)
    shifts = [0.012, -0.012, 0.012, -0.012, 0.006]
    for s in SEEDS:
        g = rng.binomial(N, base_p)
        g[:60] = 0  # unsolved problems to solve
        _write(results, "grpo", s, g)
        m = g.copy()
        m[:30] = 1
        _write(results, "hdpo_frozen_lambda0.1", s, m)
        m = g.copy()
        solved = np.flatnonzero(g > 0)[:20]
        m[solved] = 0
        _write(results, "hdpo_drifting_lambda0.1", s, m)
        m = g.copy()
        pick = rng.choice(P, P // 20, replace=False)
        m[pick] = np.clip(m[pick] + rng.choice([-1, 1], pick.size), 0, N)
        _write(results, "hdpo_frozen_lambda0.01", s, m)
        m = g.copy()
        k = int(round(abs(shifts[s - 1]) * N * P))  # count changes that move mean pass@1 by the shift
        room = np.flatnonzero(g < N) if shifts[s - 1] > 0 else np.flatnonzero(g > 0)
        m[room[:k]] += 1 if shifts[s - 1] > 0 else -1
        _write(results, "hdpo_drifting_lambda0.01", s, m)
    cfg = from_dict({"eval": {"pass_k": [1, 4, 8], "num_samples": N, "greedy": False},
                     "grpo": {"max_num_steps": END},
                     "experiment": {"methods": paper_methods(*METHODS), "seeds": list(SEEDS), "benchmarks": []}})
    return cfg, results


def _row(frame, key, selection="best"):
    return frame[(frame["key"] == key) & (frame["selection"] == selection)].iloc[0]


def test_each_verdict_on_constructed_runs(built):
    cfg, results = built
    frame = claims_frame(cfg, results)
    assert len(frame) == 8 * 3
    raises = _row(frame, "frozen_lambda0.1_raises_pass@8")
    # by hand: every seed gains exactly 30 / 2000 in pass@8, identical across seeds, so the variance of the
    # mean is the problem variance of a 0/1 difference over P, with df capped at S - 1
    d = np.zeros(P)
    d[:30] = 1.0
    half = float(t_quantile(0.975, len(SEEDS) - 1)) * d.std(ddof=1) / math.sqrt(P)
    assert raises["estimate"] == pytest.approx(0.015)
    assert (raises["low"], raises["high"]) == pytest.approx((0.015 - half, 0.015 + half))
    assert raises["verdict"] == SUPPORTED and raises["scope"] != PROBLEMS_ONLY
    assert _row(frame, "drifting_lambda0.1_raises_pass@8")["estimate"] == pytest.approx(-0.010)
    assert _row(frame, "drifting_lambda0.1_raises_pass@8")["verdict"] == CONTRADICTED
    assert _row(frame, "frozen_lambda0.01_keeps_pass@1")["verdict"] == SUPPORTED
    keeps = _row(frame, "drifting_lambda0.01_keeps_pass@1")
    assert keeps["estimate"] == pytest.approx(np.mean([0.012, -0.012, 0.012, -0.012, 0.006]), abs=1e-12)
    assert keeps["verdict"] == INCONCLUSIVE
    # what it would take, from the measured components of the same difference matrix
    assert keeps["seeds_needed"] == seeds_for_equivalence(keeps["paper_effect"], EQUIVALENCE_MARGIN,
                                                          _components(results, "hdpo_drifting_lambda0.01", "pass@1"),
                                                          POWER_PROBLEMS)
    assert keeps["seeds_needed"] > len(SEEDS) and "5 seeds" in keeps["seeds_note"]
    assert raises["seeds_needed"] == seeds_for_power(0.0158, _components(results, "hdpo_frozen_lambda0.1", "pass@8"),
                                                     POWER_PROBLEMS)


def _components(results, method, metric):
    k = int(metric[5:])
    rows = []
    for s in SEEDS:
        mats = []
        for m in (method, "grpo"):
            with gzip.open(results / "runs" / f"{m}_seed{s}" / "val_problems.jsonl.gz", "rt") as fh:
                last = [json.loads(line) for line in fh][-1]
            mats.append(np.array([pass_at_k(N, c, k) for c in last["num_correct"]]))
        rows.append(mats[0] - mats[1])
    return variance_components(np.stack(rows))


def test_one_seed_counts_problems_only_and_says_the_seeds_are_a_lower_bound(built):
    _, results = built
    one = from_dict({"eval": {"pass_k": [1, 4, 8], "num_samples": N, "greedy": False},
                     "grpo": {"max_num_steps": END},
                     "experiment": {"methods": paper_methods(*METHODS), "seeds": [1], "benchmarks": []}})
    frame = claims_frame(one, results)
    row = _row(frame, "drifting_lambda0.01_keeps_pass@1")
    assert row["scope"] == PROBLEMS_ONLY and row["n_seeds"] == 1
    assert "lower bound" in row["seeds_note"]


def test_claims_files_and_figure(built, tmp_path):
    from hdpo.report.figures import write_figures
    from hdpo.report.tables import write_tables

    cfg, results = built
    write_tables(cfg, results, tmp_path / "t")
    csv = pd.read_csv(tmp_path / "t" / "claims.csv")
    assert set(csv["verdict"]) == {SUPPORTED, CONTRADICTED, INCONCLUSIVE}
    md = (tmp_path / "t" / "claims.md").read_text()
    assert md.count("\n| λ") == 8 and "*inconclusive*" in md and "margin ±1 point" in md
    assert "+1.50 [" in md  # the frozen 0.1 pass@8 gain, in points
    line = next(ln for ln in md.splitlines() if ln.startswith("| λ = 0.01 (drifting teacher) keeps"))
    assert "seeds to show |Δ| < 1 with 80% power on 2048 problems" in line
    assert "[1] " + PROSE_VS_TABLES in md
    paths = write_figures(cfg, results, tmp_path / "f", names=("claims",))
    assert all(p.stat().st_size > 0 for p in paths)


def test_a_claim_whose_method_did_not_run_is_not_tested(tmp_path):
    cfg = from_dict({"eval": {"pass_k": [1, 4, 8], "num_samples": N}, "grpo": {"max_num_steps": END},
                     "experiment": {"methods": paper_methods("grpo"), "seeds": [1], "benchmarks": []}})
    frame = claims_frame(cfg, tmp_path / "results")
    assert len(frame) == 24 and set(frame["verdict"]) == {NOT_TESTED}


def test_a_claim_on_a_metric_the_runs_did_not_record_is_not_tested(tmp_path):
    """Runs that sample 4 per problem and record pass@1, 2 and 4 (as the demo): the pass@8 claims are 'not
    tested' with the reason, not a crash; the others are judged."""
    from hdpo.config import from_dict
    from hdpo.report.frames import claims_frame
    from synthetic_results import config as synthetic_config
    from synthetic_results import write_run

    base = synthetic_config(seeds=(1, 2))
    cfg = from_dict({**base.to_dict(), "eval": {**base.to_dict()["eval"], "pass_k": [1, 2, 4], "num_samples": 4}})
    for m in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            write_run(tmp_path, m, seed, n=4)
    frame = claims_frame(cfg, tmp_path)
    eight = frame[frame["metric"] == "pass@8"]
    assert len(eight) and (eight["verdict"] == "not tested").all()
    assert eight["reason"].str.contains("pass@8 not evaluated").all()
    assert (frame[frame["metric"] != "pass@8"]["verdict"] != "not tested").any()


def test_a_zero_width_interval_judges_nothing():
    """Two problems scored alike by both runs give the interval [0, 0]: no noise measured, no verdict."""
    from hdpo.stats import INCONCLUSIVE, claim_verdict

    assert claim_verdict(0.0, 0.0, -1, (-0.0225, -0.0166))[0] == INCONCLUSIVE
    assert claim_verdict(0.0, 0.0, 0, margin=0.01)[0] == INCONCLUSIVE
