"""The report's intervals, paired differences, selections, base-model rows and cliff tables on synthetic result
files with per-problem records (tests/synthetic_results.py), checked against direct computations."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

import synthetic_results as syn
from hdpo.passk import pass_at_k
from hdpo.report.frames import (bench_interval_frame, difference_frame, heldout_halves, interval_frame, select,
                                val_scores)
from hdpo.report.tables import write_tables
from hdpo.stats import paired_difference


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    cfg = syn.config()
    counts = syn.write_all(root / "results", cfg)
    return cfg, root / "results", counts


def _pass1(counts, step, n=8):
    return np.array([pass_at_k(n, c, 1) for c in counts[step]])


def test_best_final_and_base_rows_match_the_records(grid):
    cfg, results, counts = grid
    iv = interval_frame(cfg, results)
    row = lambda m, sel: iv[(iv["method"] == m) & (iv["selection"] == sel) & (iv["metric"] == "pass@1")].iloc[0]
    for m in cfg.experiment.methods:
        finals = np.stack([_pass1(counts[(m, s)], 40) for s in cfg.experiment.seeds])
        assert row(m, "final")["estimate"] == pytest.approx(finals.mean())
        assert row(m, "final")["steps"] == "40/40" and row(m, "final")["n_seeds"] == 2
        # best: each seed's own step of highest mean pass@1 (the first one on ties)
        best_steps = []
        for s in cfg.experiment.seeds:  # among trained steps: step 0 is the untrained model
            means = {st: _pass1(counts[(m, s)], st).mean() for st in sorted(counts[(m, s)]) if st}
            best_steps.append(max(means, key=lambda st: (means[st], -st)))
        assert row(m, "best")["steps"] == "/".join(map(str, best_steps))
        r = row(m, "best")
        assert r["low"] <= r["estimate"] <= r["high"]
    base = row("base", "step 0")
    assert base["steps"] == "0" and base["n_seeds"] == 1
    assert base["estimate"] == pytest.approx(_pass1(counts[("grpo", 1)], 0).mean())


def test_held_out_selects_on_one_half_and_reports_the_other():
    pick, report = heldout_halves([f"p{i}" for i in range(10)])
    assert len(pick) == 5 and set(pick).isdisjoint(report) and sorted(pick + report) == list(range(10))
    m = np.zeros((3, 10))
    m[1, pick] = 1.0  # step 1 looks best on the selection half only
    m[2, report] = 0.5
    t, cols = select(m, "held-out", (pick, report))
    assert t == 1 and cols == report and m[t, cols].mean() == 0.0  # the honest answer: no gain on the rest
    assert select(m, "best", (pick, report))[0] == 1 and select(m, "final", (pick, report))[0] == 2


def _perfect_step0(results, run):
    """Make a run's untrained validation (step 0) score every problem, in its records and its metrics."""
    path = results / "runs" / run / "val_problems.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh]
    for r in rows:
        if r["step"] == 0:
            r["num_correct"], r["greedy"] = [r["num_samples"]] * len(r["ids"]), [1.0] * len(r["ids"])
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = results / "runs" / run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    for r in rows:
        if r["kind"] == "val" and r["step"] == 0:
            r.update({k: 1.0 for k in r if k.startswith("val/pass@") or k == "val/greedy_acc"})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("include", [False, True])
def test_best_over_training_leaves_out_the_untrained_step_unless_configured(tmp_path, include):
    """A run whose untrained validation beats every trained one: its best (and held-out pick) is a trained step
    unless eval.best_includes_step0, in Table 1's tidy frame and in the interval and difference frames alike."""
    from hdpo.report.frames import best_candidates, table1_frame

    assert best_candidates([0, 10, 20], False) == [1, 2] and best_candidates([0, 10, 20], True) == [0, 1, 2]
    assert best_candidates([0], False) == [0]  # a 0-step run: the untrained model is all there is
    cfg = syn.config(methods=["grpo", "hdpo_drifting_lambda0.1"], seeds=(1,), best_includes_step0=include)
    results = tmp_path / "results"
    syn.write_all(results, cfg)
    _perfect_step0(results, "grpo_seed1")
    tidy = table1_frame(cfg, results)
    best = tidy[(tidy["method"] == "grpo") & (tidy["source"] == "ours") & (tidy["selection"] == "best")]
    assert set(best["step"] == 0) == {include}
    assert set(best["value"] == 1.0) == {include}
    iv = interval_frame(cfg, results)
    for sel in ("best", "held-out"):
        steps = set(iv[(iv["method"] == "grpo") & (iv["selection"] == sel)]["steps"])
        assert (steps == {"0"}) == include and ("0" in steps) == include, (sel, steps)
    diff = difference_frame(cfg, results)
    best_diff = diff[(diff["selection"] == "best") & (diff["metric"] == "pass@1")]["estimate"].iloc[0]
    assert (best_diff < -0.3) == include  # against a perfect untrained GRPO, HDPO's best looks much worse


def test_paired_differences_against_a_direct_computation(grid):
    cfg, results, counts = grid
    diffs = difference_frame(cfg, results)
    assert set(diffs["method"]) == set(cfg.experiment.methods) - {"grpo"}
    r = diffs[(diffs["method"] == "hdpo_frozen_lambda0.1") & (diffs["selection"] == "final")
              & (diffs["metric"] == "pass@1")].iloc[0]
    a = np.stack([_pass1(counts[("hdpo_frozen_lambda0.1", s)], 40) for s in (1, 2)])
    b = np.stack([_pass1(counts[("grpo", s)], 40) for s in (1, 2)])
    ref = paired_difference(a, b)
    assert (r["estimate"], r["low"], r["high"], r["p_value"]) == pytest.approx(
        (ref.estimate, ref.low, ref.high, ref.p_value))
    # the built-in +0.15 effect is estimated; 2 seeds leave the seed variance 1 degree of freedom (t = 12.7), so
    # the interval is wide, and the p-value says the same as the interval
    assert r["estimate"] > 0.1 and r["low"] < 0.15 < r["high"] and (r["p_value"] < 0.05) == (r["low"] > 0)
    assert r["paper_h200"] == pytest.approx(0.6304 - 0.6519)
    null = diffs[(diffs["method"] == "hdpo_drifting_lambda0.01") & (diffs["selection"] == "final")
                 & (diffs["metric"] == "pass@1")].iloc[0]
    assert null["low"] < 0 < null["high"]  # no built-in effect: the interval holds 0


def test_tables_mark_the_untrained_best_and_keep_precision_honest(grid, tmp_path):
    cfg, results, _ = grid
    write_tables(cfg, results, tmp_path)
    bench = (tmp_path / "benchmarks.md").read_text()
    grpo_row = next(l for l in bench.splitlines() if l.startswith("| GRPO baseline"))
    assert grpo_row.rstrip(" |").endswith("0 (untrained)")  # its best checkpoint is the step-0 model
    assert "| base model (step 0) |" in bench
    ci = bench_interval_frame(cfg, results)
    assert bool(ci[(ci["method"] == "grpo") & (ci["checkpoint"] == "best")]["untrained"].all())
    assert not ci[(ci["method"] == "grpo") & (ci["checkpoint"] == "final")]["untrained"].any()
    # 20 benchmark problems: intervals ~ +-0.1, so 2 or 3 decimals, never the 4 of a point estimate
    cells = [c.strip() for c in grpo_row.split("|")[2:-1]]
    assert all(len(c.split(" [")[0].split(".")[-1]) <= 3 for c in cells if "[" in c)
    val = (tmp_path / "validation.md").read_text()
    assert "held-out" in val and "| base model (step 0) |" in val
    diffs = (tmp_path / "differences.md").read_text()
    assert "p=" in diffs and "HDPO frozen, λ=0.1" in diffs


def test_cliff_table_counts_each_runs_ledger(grid, tmp_path):
    """cliffs.csv against each run's ledger and probe records, counted here with pandas: totals, the teacher's
    pass rate, former cliffs met and solved again later, and the last probe's solved fraction."""
    import pandas as pd

    cfg, results, _ = grid
    write_tables(cfg, results, tmp_path)
    table = pd.read_csv(tmp_path / "cliffs.csv")
    assert len(table) == len(cfg.experiment.methods) * len(cfg.experiment.seeds)
    for row in table.itertuples(index=False):
        run = results / "runs" / f"{row.method}_seed{row.seed}"
        led = pd.read_json(run / "cliffs.jsonl", lines=True)
        assert (row.prompts, row.cliffs, row.distilled) == (len(led), led["cliff"].sum(), led["distilled"].sum())
        gen, kept = led["privileged_generated"].sum(), led["privileged_kept"].sum()
        assert (row.privileged_generated, row.privileged_kept) == (gen, kept)
        assert (row.teacher_pass_rate == pytest.approx(kept / gen)) if gen else np.isnan(row.teacher_pass_rate)
        first = led[led["cliff"]].groupby("index")["step"].min()
        later = led[led["index"].isin(first.index) & (led["step"] > led["index"].map(first))]
        solved = later[later["rewards"].map(sum) > 0]
        assert (row.former_cliffs, row.met_again, row.solved_again) == (
            len(first), later["index"].nunique(), solved["index"].nunique())
        with gzip.open(run / "val_problems.jsonl.gz", "rt") as fh:
            probes = [r for r in map(json.loads, fh) if r.get("set") == "cliff_probe"]
        last = max(probes, key=lambda r: r["step"])
        assert row.probe_step == last["step"] and row.probe_problems == len(last["ids"])
        assert row.probe_solved == pytest.approx(np.mean([c > 0 for c in last["num_correct"]]))


def test_runs_without_per_problem_records_keep_point_estimates(tmp_path):
    cfg = syn.config(methods=["grpo"], seeds=[1])
    syn.write_run(tmp_path / "results", "grpo", 1)
    (tmp_path / "results" / "runs" / "grpo_seed1" / "val_problems.jsonl.gz").unlink()
    assert val_scores(cfg, tmp_path / "results") == {}
    write_tables(cfg, tmp_path / "results", tmp_path / "t")
    assert "No per-problem validation records yet" in (tmp_path / "t" / "validation.md").read_text()
    assert "[" not in (tmp_path / "t" / "table1.md").read_text().split("| GRPO baseline")[1].splitlines()[0]


def test_every_figure_renders_with_a_zero_bar(tmp_path):
    from hdpo.report.figures import FIGURE_NAMES, write_figures

    cfg = syn.config(methods=["grpo", "hdpo_frozen_lambda0.1"], seeds=[1], benchmarks=["math500"])
    syn.write_all(tmp_path / "results", cfg, n_problems=20, bench_problems=6)
    syn.write_eval(tmp_path / "results", "base", "base", "math500", np.zeros(6), 0, 0)  # scores exactly 0
    paths = write_figures(cfg, tmp_path / "results", tmp_path / "fig")
    assert sorted(p.name for p in paths) == sorted(f"{n}.{e}" for n in FIGURE_NAMES for e in ("png", "pdf"))
    assert all(p.stat().st_size > 0 for p in paths)


def test_an_unfinished_run_has_no_final_step(tmp_path, caplog):
    """A run whose last validation is not its configured last step (still training, or killed) is left out
    of the final selection instead of being compared with finished runs at another step."""
    m = np.zeros((3, 4))
    halves = heldout_halves([f"p{i}" for i in range(4)])
    assert select(m, "final", halves, steps=[0, 10, 20], last_step=40) is None
    assert select(m, "final", halves, steps=[0, 20, 40], last_step=40)[0] == 2
    cfg = syn.config(methods=["grpo", "hdpo_frozen_lambda0.1"], seeds=(1, 2))
    results = tmp_path / "results"
    syn.write_all(results, cfg)
    syn.write_run(results, "grpo", 2, steps=30)  # seed 2 of GRPO stopped at step 30 of 40
    iv = interval_frame(cfg, results)
    final = iv[(iv["method"] == "grpo") & (iv["selection"] == "final")]
    assert set(final["steps"]) == {"40"} and set(final["n_seeds"]) == {1}
    assert "grpo_seed2: last validation at step 30, not the configured last step 40" in caplog.text
    diff = difference_frame(cfg, results)
    assert set(diff[diff["selection"] == "final"]["n_seeds"]) == {1}  # paired on the finished seed only
