"""hdpo.report on synthetic aggregated files: tables hold every method, "best" is the max over validation rows,
differences are ours − paper, every file is written, and missing results never crash the report."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pandas as pd
import pytest

from hdpo.config import from_dict, paper_methods
from hdpo.paper import PAPER_RESULTS
from hdpo.report.tables import TABLE_FILES
from hdpo.report import (FIGURE_NAMES, MISSING, benchmarks_frame, method_label, table1_cells, table1_frame,  # noqa
                         write_figures, write_tables)

METHODS = ["grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.01"]


def make_cfg(methods=METHODS, seeds=(42,), benchmarks=("math500", "aime24"), checkpoints=("final", "best")):
    return from_dict({"eval": {"pass_k": [1, 4, 8], "num_samples": 8}, "grpo": {"max_num_steps": 120},
                      "experiment": {"methods": paper_methods(*methods), "seeds": list(seeds), "benchmarks": list(benchmarks),
                                     "checkpoints": list(checkpoints)}})


def make_run(results: Path, method: str, seed: int, steps: int = 120, val_period: int = 10, rng_seed: int = 0) -> list:
    """Write a synthetic metrics.jsonl + summary.json for one run; return the validation rows."""
    rng = random.Random(f"{method}-{seed}-{rng_seed}")
    lam = paper_methods(method)[method]["distill_weight"]
    hdpo = lam > 0
    run = results / "runs" / f"{method}_seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    rows, vals = [], []
    for step in range(steps + 1):
        if step % val_period == 0 or step == steps:
            t = step / steps
            p1 = 0.55 + 0.10 * (1 - math.exp(-3 * t)) - 0.02 * lam * 10 * t + rng.gauss(0, 0.006)
            p4 = 0.72 + 0.06 * (1 - math.exp(-3 * t)) + rng.gauss(0, 0.005)
            p8 = 0.78 + 0.045 * (1 - math.exp(-3 * t)) + 0.015 * lam * 10 * t + rng.gauss(0, 0.005)
            row = {"kind": "val", "step": step, "val/pass@1": p1, "val/pass@4": p4, "val/pass@8": p8,
                   "val/greedy_acc": p1 + 0.01, "val/num_problems": 2048, "val/num_samples": 8, "time/eval": 1.0}
            rows.append(row)
            vals.append(row)
        if step < steps:
            cliffs = max(0, int(rng.gauss(6 - 3 * step / steps, 1.5)))
            generated = cliffs * 16 if hdpo else 0
            kept = int(generated * min(1, max(0, rng.gauss(0.35 + 0.1 * step / steps, 0.05))))
            rows.append({"kind": "train", "step": step + 1, "loss/grpo": rng.gauss(0, 0.01), "loss/jsd": 0.1,
                         "loss/total": 0.1, "reward/mean": 0.6, "cliffs": cliffs, "cliff_fraction": cliffs / 32,
                         "privileged/generated": generated, "privileged/kept": kept,
                         "teacher_pass_rate": (kept / generated) if generated else None,
                         "tokens/grpo": 1000, "tokens/distill": 10, "tokens/generated": 2000, "lr": 1e-6,
                         "grad_norm": 0.5, "time/step": 1.0, "reward/parse_failures": 0, "reward/timeouts": 0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"run": run.name, "method": method, "seed": seed, "steps": steps}))
    return vals


def make_eval(results: Path, method: str, seed: int, ckpt: str, bench: str) -> dict:
    rng = random.Random(f"{method}-{seed}-{ckpt}-{bench}")
    base = 0.6 if bench == "math500" else 0.1
    obj = {"run": f"{method}_seed{seed}", "method": method, "seed": seed, "checkpoint": ckpt, "benchmark": bench,
           "model_step": 120, "num_problems": 500 if bench == "math500" else 30, "num_samples": 8,
           "temperature": 1.0, "pass@1": base + rng.uniform(0, 0.05), "pass@4": base + 0.1 + rng.uniform(0, 0.05),
           "pass@8": base + 0.15 + rng.uniform(0, 0.05), "greedy_acc": base + rng.uniform(0, 0.05),
           "reward_stats": {}}
    path = results / "eval" / f"{method}_seed{seed}" / ckpt / f"{bench}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return obj


def make_results(results: Path, cfg) -> dict:
    vals = {}
    for m in cfg.experiment.methods:
        for s in cfg.experiment.seeds:
            vals[(m, s)] = make_run(results, m, s)
            for c in cfg.experiment.checkpoints:
                for b in cfg.experiment.benchmarks:
                    make_eval(results, m, s, c, b)
    return vals


@pytest.fixture()
def full(tmp_path):
    cfg = make_cfg()
    results = tmp_path / "results"
    vals = make_results(results, cfg)
    return cfg, results, vals


def test_best_is_max_over_val_rows_and_final_is_last(full):
    cfg, results, vals = full
    tidy = table1_frame(cfg, results)
    ours = tidy[tidy["source"] == "ours"]
    for (method, seed), rows in vals.items():
        for metric in ["pass@1", "pass@4", "pass@8", "greedy_acc"]:
            series = [(r["step"], r[f"val/{metric}"]) for r in rows]
            best_value = max(v for _, v in series)
            best_step = min(s for s, v in series if v == best_value)
            got = ours[(ours["method"] == method) & (ours["seed"] == seed) & (ours["metric"] == metric)]
            best = got[got["selection"] == "best"].iloc[0]
            final = got[got["selection"] == "final"].iloc[0]
            assert best["value"] == pytest.approx(best_value, abs=0)
            assert best["step"] == best_step
            assert final["value"] == pytest.approx(series[-1][1], abs=0)
            assert final["step"] == series[-1][0]


def test_an_unfinished_run_has_no_final_in_table1(tmp_path, caplog):
    """Table 1's final is the configured last step, as select("final"): a run stopped at step 60 of 120 has
    no final (it used to show step 60's value beside finished runs' step 120)."""
    cfg = make_cfg(methods=["grpo"], seeds=(1, 2), benchmarks=())
    results = tmp_path / "results"
    make_run(results, "grpo", 1)
    make_run(results, "grpo", 2, steps=60)
    tidy = table1_frame(cfg, results)
    final = tidy[(tidy["source"] == "ours") & (tidy["selection"] == "final")]
    assert set(final["seed"]) == {1} and set(final["step"]) == {120}
    assert "grpo_seed2 pass@1: last validation with a value at step 60, not the configured last step 120" \
        in caplog.text
    best = tidy[(tidy["source"] == "ours") & (tidy["selection"] == "best")]
    assert set(best["seed"]) == {1, 2}  # best over training still counts the unfinished run


def test_best_ignores_summary_json(full):
    """A stale summary.json cannot change the table: the best comes from metrics.jsonl."""
    cfg, results, vals = full
    (results / "runs" / "grpo_seed42" / "summary.json").write_text(json.dumps(
        {"best": {"pass@1": {"value": 0.99, "step": 1}}}))
    tidy = table1_frame(cfg, results)
    got = tidy[(tidy["source"] == "ours") & (tidy["method"] == "grpo") & (tidy["selection"] == "best")
               & (tidy["metric"] == "pass@1")]["value"].iloc[0]
    assert got == pytest.approx(max(r["val/pass@1"] for r in vals[("grpo", 42)]))


def test_differences_are_ours_minus_paper(full):
    cfg, results, vals = full
    tidy = table1_frame(cfg, results)
    cells = table1_cells(cfg, tidy)
    md = None
    write_tables(cfg, results, results / "tables")
    md = (results / "tables" / "table1.md").read_text()
    for method in cfg.experiment.methods:
        for metric in ["pass@1", "pass@4", "pass@8"]:
            ours = max(r[f"val/{metric}"] for r in vals[(method, 42)])
            for source in ("paper_h200", "paper_h100"):
                diff = cells[(method, f"diff_{source}", metric)]
                assert diff.mean == pytest.approx(ours - PAPER_RESULTS[source][method][metric], abs=1e-12)
                assert f"{diff.mean:+.4f}" in md
    # the paper's pass@1 may be greedy accuracy: our best greedy accuracy is set against it too
    for method in cfg.experiment.methods:
        ours = max(r["val/greedy_acc"] for r in vals[(method, 42)] if r["step"] > 0)
        for source in ("paper_h200", "paper_h100"):
            diff = cells[(method, f"diff_{source}", "greedy_acc")]
            assert diff.mean == pytest.approx(ours - PAPER_RESULTS[source][method]["pass@1"], abs=1e-12)
            assert f"{diff.mean:+.4f}" in md
    assert "greedy acc. vs pass@1" in md and "trained steps (step 0 only in a run of 0 steps)" in md


def test_tables_contain_every_method_and_paper_numbers(full):
    cfg, results, _ = full
    out = results / "tables"
    paths = write_tables(cfg, results, out)
    assert {p.name for p in paths} == set(TABLE_FILES)
    for p in paths:
        assert p.stat().st_size > 0
    tidy = pd.read_csv(out / "table1.csv")
    assert list(tidy.columns) == ["method", "seed", "source", "selection", "metric", "value", "step"]
    assert set(tidy["method"]) == set(METHODS)
    assert set(tidy["source"]) == {"ours", "paper_h200", "paper_h100"}
    assert set(tidy["selection"]) == {"best", "final"}
    paper = tidy[(tidy["source"] == "paper_h200") & (tidy["method"] == "hdpo_frozen_lambda0.1")
                 & (tidy["metric"] == "pass@8")]
    assert paper["value"].iloc[0] == pytest.approx(0.8398)
    md = (out / "table1.md").read_text()
    tex = (out / "table1.tex").read_text()
    for m in METHODS:
        assert method_label(m, "md") in md
        assert method_label(m, "tex") in tex
    assert "0.8398" in md and "0.8398" in tex
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") >= 3
    # rows in config order
    positions = [md.index(method_label(m, "md")) for m in METHODS]
    assert positions == sorted(positions)
    bench = pd.read_csv(out / "benchmarks.csv")
    assert set(bench["method"]) == set(METHODS)
    assert set(bench["benchmark"]) == {"math500", "aime24"}
    assert set(bench["checkpoint"]) == {"final", "best"}
    bmd = (out / "benchmarks.md").read_text()
    assert "MATH-500" in bmd and "AIME 2024" in bmd


def test_seeds_give_mean_and_std(tmp_path):
    cfg = make_cfg(seeds=(1, 2, 3))
    results = tmp_path / "results"
    vals = make_results(results, cfg)
    cells = table1_cells(cfg, table1_frame(cfg, results))
    bests = [max(r["val/pass@4"] for r in vals[("grpo", s)]) for s in (1, 2, 3)]
    cell = cells[("grpo", "ours_best", "pass@4")]
    assert cell.n == 3
    assert cell.mean == pytest.approx(sum(bests) / 3)
    assert cell.std == pytest.approx(pd.Series(bests).std(ddof=1))
    write_tables(cfg, results, results / "tables")
    assert f"{cell.mean:.4f} ± {cell.std:.4f}" in (results / "tables" / "table1.md").read_text()


def test_missing_results_do_not_crash(tmp_path):
    """One method never ran, one has no eval files, one metrics file ends in a cut line: '–', no error."""
    cfg = make_cfg(methods=["grpo", "hdpo_frozen_lambda0.01", "hdpo_drifting_lambda0.1"])
    results = tmp_path / "results"
    make_run(results, "grpo", 42)
    make_eval(results, "grpo", 42, "final", "math500")  # only one of the four eval files
    make_run(results, "hdpo_frozen_lambda0.01", 42)
    with open(results / "runs" / "hdpo_frozen_lambda0.01_seed42" / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "val", "step": 999, "val/pa')  # a crash mid-line
    (results / "eval" / "grpo_seed42" / "best").mkdir(parents=True)
    (results / "eval" / "grpo_seed42" / "best" / "aime24.json").write_text("{not json")
    paths = write_tables(cfg, results, results / "tables")
    md = (results / "tables" / "table1.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {method_label('hdpo_drifting_lambda0.1')} |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert cells[:4] == [MISSING] * 4  # ours: nothing
    assert "0.6294" in row  # the paper's number is still there
    bench = benchmarks_frame(cfg, results)
    assert set(zip(bench["method"], bench["checkpoint"], bench["benchmark"])) == {("grpo", "final", "math500")}
    assert MISSING in (results / "tables" / "benchmarks.md").read_text()
    figs = write_figures(cfg, results, tmp_path / "figures")
    assert len(figs) == 2 * len(FIGURE_NAMES)
    for p in paths + figs:
        assert p.exists() and p.stat().st_size > 0


def test_no_results_at_all(tmp_path):
    cfg = make_cfg()
    paths = write_tables(cfg, tmp_path / "results", tmp_path / "tables")
    figs = write_figures(cfg, tmp_path / "results", tmp_path / "figures")
    for p in paths + figs:
        assert p.exists() and p.stat().st_size > 0
    assert MISSING in (tmp_path / "tables" / "table1.md").read_text()


def test_figures_png_and_pdf(full):
    cfg, results, _ = full
    out = results.parent / "figures"
    paths = write_figures(cfg, results, out)
    assert {p.name for p in paths} == {f"{n}.{e}" for n in FIGURE_NAMES for e in ("png", "pdf")}
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 5000
        assert data[:4] == (b"\x89PNG" if p.suffix == ".png" else b"%PDF")
    assert not list(out.glob("*.tmp"))  # written atomically, no leftovers


def test_tick_labels_stay_a_few_characters_wide():
    """A method with settings of its own (its label can be long) gets a wrapped tick label, so it does not run
    into its neighbours' in the benchmark and cliff figures."""
    from hdpo.report.names import method_short, methods_of

    long = "HDPO drifting, λ=0.1, expand-then-sharpen"
    cfg = from_dict({"experiment": {"methods": {
        **paper_methods("grpo", "hdpo_frozen_lambda0.1"),
        "ets": {"label": long, "distill_weight": 0.1, "settings": {"hdpo.reinject_cliffs_after_steps": 1}},
        "grpo_long": {"label": "GRPO with a much longer group size", "distill_weight": 0.0,
                      "settings": {"grpo.num_generations_per_prompt": 32}}}}})
    methods_of(cfg)
    assert method_short("grpo") == "GRPO" and method_short("hdpo_frozen_lambda0.1") == "frozen\nλ=0.1"
    assert method_short("ets") == "drifting\nλ=0.1\nexpand-then-\nsharpen"  # 'HDPO' dropped, commas too
    assert all(len(line) <= 12 for m in ("ets", "grpo_long") for line in method_short(m).split("\n"))


def test_rates_outside_zero_one_are_left_out_with_a_warning(full, caplog):
    """A hand-edited or corrupted result (pass@1 = 7.5, -3) never becomes a table's number, and no other step
    stands in for a left-out one: no final without a value at the last validation, no best from step 0 when
    no trained step has a value."""
    cfg, results, vals = full
    path = results / "runs" / "grpo_seed42" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    last = max(r["step"] for r in rows if r["kind"] == "val")
    for r in rows:
        if r["kind"] == "val" and r["step"] == last:
            r["val/pass@1"] = -3.0
        if r["kind"] == "val" and r["step"] == 10:
            r["val/pass@4"] = 7.5
        if r["kind"] == "val" and r["step"] > 0:
            r["val/pass@8"] = None  # only the untrained step has a pass@8: it must not become the best
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = results / "eval" / "grpo_seed42" / "final" / "math500.json"
    ev.write_text(json.dumps({**json.loads(ev.read_text()), "pass@1": 7.5}))
    with caplog.at_level("WARNING"):
        tidy = table1_frame(cfg, results)
        bench = benchmarks_frame(cfg, results)
    ours = tidy[(tidy["method"] == "grpo") & (tidy["source"] == "ours")]
    assert ours["value"].between(0, 1).all()
    final = ours[ours["selection"] == "final"]
    assert "pass@1" not in set(final["metric"]) and (final["step"] == last).all()  # no other step stands in
    assert f"grpo_seed42 pass@1: last validation with a value at step 110, not the configured last step {last}" \
        in caplog.text
    assert "pass@8" not in set(ours["metric"]) and "grpo_seed42 pass@8: no trained step has a value" in caplog.text
    assert bench["value"].between(0, 1).all()
    assert not ((bench["method"] == "grpo") & (bench["checkpoint"] == "final") & (bench["benchmark"] == "math500")
                & (bench["metric"] == "pass@1")).any()
    assert f"step {last}: val/pass@1" in caplog.text and "step 10: val/pass@4" in caplog.text
    assert f"{ev}: pass@1" in caplog.text and "not a rate in [0, 1]" in caplog.text
