"""Aggregation: the result files of a grid of runs into tidy frames and per-problem score matrices.

Reads, for the config's grid (experiment.methods x seeds, then checkpoints x benchmarks):
  results/runs/<run>/metrics.jsonl               train rows (losses, cliffs, teacher pass rate) and val rows
  results/runs/<run>/val_problems.jsonl.gz       per validation step, every problem's correct count and greedy reward
  results/runs/<run>/cliffs.jsonl                the cliff ledger (hdpo/ledger.py)
  results/eval/<run>/<checkpoint>/<bench>.json   benchmark results (+ .samples.jsonl.gz per problem)
  results/eval/base/<bench>.json                 the untrained model on each benchmark
never a checkpoint, so a report regenerates in seconds. A run or file that is missing leaves a gap, never an
error; a malformed row is skipped with a warning naming the file and row.

Selections of a validation step (per run): `best` = the step with the highest mean (first such step; the
paper's optimistic selection), `final` = the validation at the configured last step (none for an unfinished
run), `held-out` = the step that is best on one
half of the validation problems, scored on the other half (an honest estimate of what selection buys).
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from hdpo.config import Config, run_config
from hdpo.io import samples_path
from hdpo.passk import pass_at_k
from hdpo.paper import (BASELINE, EQUIVALENCE_MARGIN, PAPER_CLAIMS, PAPER_SEED, PAPER_SELECTION, SOURCES, Claim,
                        claim_differences, claim_effect, claim_range, paper_value)
from hdpo.report.names import BASE, baseline_of, run_name, val_metrics
from hdpo.stats import (Interval, claim_verdict, equivalence_power, mean_interval, minimum_detectable_effect,
                        minimum_equivalence_margin, paired_difference, power, seeds_for_equivalence, seeds_for_power)

logger = logging.getLogger(__name__)

OURS = "ours"
SELECTIONS = ("best", "final")
INTERVAL_SELECTIONS = ("best", "final", "held-out")
TABLE1_COLUMNS = ["method", "seed", "source", "selection", "metric", "value", "step"]
BENCH_COLUMNS = ["method", "seed", "checkpoint", "benchmark", "metric", "value", "model_step", "num_problems",
                 "num_samples"]
# scope: what an interval's uncertainty counts (hdpo.stats: problems and seeds, or problems only with one seed)
INTERVAL_COLUMNS = ["method", "selection", "metric", "estimate", "low", "high", "n_problems", "n_seeds", "steps",
                    "scope"]
DIFF_COLUMNS = ["method", "baseline", "selection", "metric", "estimate", "low", "high", "p_value", "n_problems",
                "n_seeds", "scope", "paper_h200", "paper_h100"]
BENCH_INTERVAL_COLUMNS = ["method", "checkpoint", "benchmark", "metric", "estimate", "low", "high", "n_problems",
                          "n_seeds", "steps", "untrained", "scope"]
# claims: one row per (claim, selection); paper_*: the paper's method − GRPO; margin: the equivalence margin of a
# "keeps" claim; seeds_needed / power_ours / mde: hdpo.report.frames.claim_power
CLAIM_COLUMNS = ["claim", "key", "method", "metric", "direction", "paper_h200", "paper_h100", "paper_low",
                 "paper_high", "margin", "selection", "estimate", "low", "high", "p_value", "n_seeds", "n_problems",
                 "scope", "verdict", "reason", "paper_effect", "seeds_needed", "seeds_note", "power_ours", "mde",
                 "note"]
POWER_PROBLEMS = 2048  # the paper's validation split: the design the seeds needed are computed for
RATE = (0.0, 1.0)  # pass@k and accuracy: their intervals are clipped to what a rate can be


# --- reading the aggregated files (tolerant: bad input is reported and skipped) -----------------------------------

def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl rows; a malformed line (e.g. cut by a crash) is skipped with a warning naming file and row."""
    return read_records(path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        logger.warning("%s: not valid JSON (%s); skipped", path, err)
        return None
    if not isinstance(obj, dict):
        logger.warning("%s: not a JSON object; skipped", path)
        return None
    return obj


def _rate(value: Any, where: str) -> float:
    """A pass@k or accuracy: a number in [0, 1], else NaN (left out) with a warning naming where it was."""
    v = _number(value)
    if not math.isnan(v) and not 0.0 <= v <= 1.0:
        logger.warning("%s: %s is not a rate in [0, 1]; left out", where, v)
        return math.nan
    return v


def _number(value: Any) -> float:
    """A finite float, or NaN for null / missing / non-numeric."""
    if isinstance(value, bool) or value is None:
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _rows_by_step(rows: list[dict], kind: str) -> list[dict]:
    """Rows of one kind, one per step (the last one written wins: a resumed run may repeat a step), by step."""
    by_step: dict[int, dict] = {}
    for row in rows:
        if row.get("kind") != kind:
            continue
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
            continue
        by_step[int(step)] = row
    return [by_step[s] for s in sorted(by_step)]


def val_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """Long frame of validation rows: method, seed, step, metric, value (NaN rows dropped)."""
    results_dir = Path(results_dir)
    records = []
    metrics = val_metrics(cfg)
    for method in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            rows = read_metrics(results_dir / "runs" / run_name(method, seed) / "metrics.jsonl")
            for row in _rows_by_step(rows, "val"):
                for m in metrics:
                    v = _rate(row.get(f"val/{m}"), f"{run_name(method, seed)}/metrics.jsonl: step {row.get('step')}: "
                                                   f"val/{m}")
                    if not math.isnan(v):
                        records.append({"method": method, "seed": int(seed), "step": int(row["step"]),
                                        "metric": m, "value": v})
    return pd.DataFrame.from_records(records, columns=["method", "seed", "step", "metric", "value"])


def train_frame(cfg: Config, results_dir: str | Path, keys: Iterable[str]) -> pd.DataFrame:
    """Wide frame of train rows: method, seed, step and the requested keys (NaN where null)."""
    results_dir = Path(results_dir)
    keys = list(keys)
    records = []
    for method in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            rows = read_metrics(results_dir / "runs" / run_name(method, seed) / "metrics.jsonl")
            for row in _rows_by_step(rows, "train"):
                rec = {"method": method, "seed": int(seed), "step": int(row["step"])}
                rec.update({k: _number(row.get(k)) for k in keys})
                records.append(rec)
    return pd.DataFrame.from_records(records, columns=["method", "seed", "step", *keys])


def _val_info(cfg: Config, results_dir: Path) -> dict:
    """num_problems / num_samples of the validation, from the first val row that has them."""
    for method in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            for row in _rows_by_step(read_metrics(results_dir / "runs" / run_name(method, seed) / "metrics.jsonl"),
                                     "val"):
                n_prob, n_samp = _number(row.get("val/num_problems")), _number(row.get("val/num_samples"))
                if not math.isnan(n_prob):
                    return {"num_problems": int(n_prob),
                            "num_samples": None if math.isnan(n_samp) else int(n_samp)}
    return {"num_problems": None, "num_samples": None}


# --- the tidy tables ----------------------------------------------------------------------------------------------

def table1_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """The truth of Table 1: one row per (method, seed, source, selection, metric).

    ours / best:  max over validation rows of that metric, step = first step reaching it
    ours / final: the validation at the run's configured last step (final_step); none for a run that has not
                  reached it
    paper_*:      the paper's numbers (best over training, seed 42, no step)
    """
    val = val_frame(cfg, results_dir)
    records = []
    run_last = val.groupby(["method", "seed"])["step"].max()  # the run's last validation, whatever the metric
    for (method, seed, metric), grp in val.groupby(["method", "seed", "metric"], sort=False):
        grp = grp.sort_values("step", kind="stable")
        last_step = int(run_last[(method, seed)])
        pool = grp.iloc[best_candidates(grp["step"].tolist(), cfg.eval.best_includes_step0, last_step)]
        where = f"{run_name(method, seed)} {metric}"
        if pool.empty:
            logger.warning("%s: no trained step has a value: no best", where)
        else:
            best = pool.loc[pool["value"].idxmax()]  # idxmax: the first (earliest) maximum
            records.append({"method": method, "seed": seed, "source": OURS, "selection": "best", "metric": metric,
                            "value": float(best["value"]), "step": int(best["step"])})
        last, end = grp.iloc[-1], final_step(cfg, method)
        # final = the configured last step (as select("final")): an unfinished run, or a value missing or out
        # of range there, has none, rather than another step's value compared with finished runs
        if int(last["step"]) != end:
            logger.warning("%s: last validation with a value at step %d, not the configured last step %d: "
                           "no final", where, int(last["step"]), end)
        else:
            records.append({"method": method, "seed": seed, "source": OURS, "selection": "final", "metric": metric,
                            "value": float(last["value"]), "step": int(last["step"])})
    for source in SOURCES:
        for method in cfg.experiment.methods:
            for metric in val_metrics(cfg):
                value = paper_value(source, method, metric)
                if value is not None:
                    records.append({"method": method, "seed": PAPER_SEED, "source": source,
                                    "selection": PAPER_SELECTION, "metric": metric, "value": float(value),
                                    "step": None})
    frame = pd.DataFrame.from_records(records, columns=TABLE1_COLUMNS)
    frame["step"] = frame["step"].astype("Int64")
    frame["seed"] = frame["seed"].astype("Int64")
    return _sort(frame, cfg, ["source", "selection"])


def benchmarks_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """The truth of the benchmark table: one row per (method, seed, checkpoint, benchmark, metric); the untrained
    model is method `base`, checkpoint `base`, no seed."""
    results_dir = Path(results_dir)
    records = []
    plan = [(BASE, [None], ["base"])] + [(m, cfg.experiment.seeds, cfg.experiment.checkpoints)
                                         for m in cfg.experiment.methods]
    for method, seeds, ckpts in plan:
        for seed in seeds:
            for ckpt in ckpts:
                for bench in cfg.experiment.benchmarks:
                    path = _eval_path(results_dir, method, seed, ckpt, bench)
                    obj = _read_json(path)
                    if obj is None:
                        continue
                    metrics = sorted((k for k in obj if re.fullmatch(r"pass@\d+", k)), key=lambda k: int(k[5:]))
                    metrics += ["greedy_acc"] if "greedy_acc" in obj else []
                    for m in metrics:
                        v = _rate(obj.get(m), f"{path}: {m}")
                        if math.isnan(v):
                            continue
                        records.append({"method": method, "seed": None if seed is None else int(seed),
                                        "checkpoint": ckpt, "benchmark": bench,
                                        "metric": m, "value": v, "model_step": _opt_int(obj.get("model_step")),
                                        "num_problems": _opt_int(obj.get("num_problems")),
                                        "num_samples": _opt_int(obj.get("num_samples"))})
    frame = pd.DataFrame.from_records(records, columns=BENCH_COLUMNS)
    for col in ("seed", "model_step", "num_problems", "num_samples"):
        frame[col] = frame[col].astype("Int64")
    return _sort(frame, cfg, ["benchmark", "checkpoint"])


def _opt_int(value: Any) -> Optional[int]:
    v = _number(value)
    return None if math.isnan(v) else int(v)


def _sort(frame: pd.DataFrame, cfg: Config, extra: list[str]) -> pd.DataFrame:
    """Methods in config order, then the given columns in their natural (config / source) order."""
    orders = {
        "method": [BASE, *cfg.experiment.methods],
        "source": [OURS, *SOURCES],
        "selection": list(SELECTIONS),
        "benchmark": list(cfg.experiment.benchmarks),
        "checkpoint": ["base", *cfg.experiment.checkpoints],
    }
    metric_order = {m: i for i, m in enumerate(val_metrics(cfg))}

    def key(col: pd.Series) -> pd.Series:
        if col.name in orders:
            pos = {v: i for i, v in enumerate(orders[col.name])}
            return col.map(lambda v: pos.get(v, len(pos)))
        if col.name == "metric":
            return col.map(lambda m: metric_order.get(m, 1000 + (int(m[5:]) if m.startswith("pass@") else 999)))
        return col

    cols = ["method", *extra, "metric", "seed"]
    return frame.sort_values(cols, key=key, kind="stable").reset_index(drop=True)


# --- aggregation over seeds -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """A table cell: mean (± std over n seeds), or a signed difference; with a 95% interval [low, high] (and a
    p-value for a paired difference) where per-problem records allow one."""
    mean: float
    std: float = math.nan
    n: int = 1
    signed: bool = False
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    note: str = ""  # e.g. "step 0": the value of the untrained model

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def _cell(values: Iterable[float]) -> Optional[Cell]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    s = pd.Series(vals)
    return Cell(mean=float(s.mean()), std=float(s.std(ddof=1)) if len(vals) > 1 else math.nan, n=len(vals))


def summarize(frame: pd.DataFrame, by: list[str]) -> dict[tuple, Cell]:
    """Group a tidy frame and reduce `value` over seeds to a Cell."""
    out: dict[tuple, Cell] = {}
    if frame.empty:
        return out
    for keys, grp in frame.groupby(by, sort=False):
        cell = _cell(grp["value"].tolist())
        if cell is not None:
            out[keys if isinstance(keys, tuple) else (keys,)] = cell
    return out


# --- per-problem scores -------------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    """A (gzipped) JSONL file of per-problem records; [] when missing, bad rows skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    logger.warning("%s: row %d: not valid JSON (%s); skipped", path, i, err.msg)
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    logger.warning("%s: row %d: not a JSON object; skipped", path, i)
    except (OSError, EOFError) as err:  # a truncated gzip file
        logger.warning("%s: unreadable (%s); rows after the damage skipped", path, err)
    return rows


def problem_scores(num_correct: list, greedy: list, n: int, metric: str) -> np.ndarray:
    """One run's per-problem score for a metric: the unbiased pass@k of each problem, or its greedy reward
    (NaN where there is none)."""
    if metric == "greedy_acc":
        return np.array([math.nan if g is None else float(g) for g in greedy], dtype=float)
    k = int(metric[5:])
    return np.array([pass_at_k(n, int(c), k) if k <= n else math.nan for c in num_correct], dtype=float)


@dataclass
class RunScores:
    """Per-problem validation scores of one run: steps [T], problem ids [P] (sorted), scores[metric] [T, P]."""
    steps: list[int]
    ids: list[str]
    scores: dict[str, np.ndarray]


def val_scores(cfg: Config, results_dir: str | Path) -> dict[tuple[str, int], RunScores]:
    """(method, seed) -> per-problem validation scores, from val_problems.jsonl.gz (runs without it left out)."""
    out = {}
    for method in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            path = Path(results_dir) / "runs" / run_name(method, seed) / "val_problems.jsonl.gz"
            by_step: dict[int, dict] = {}
            for i, row in enumerate(read_records(path), 1):
                if row.get("set", "val") != "val":  # e.g. the cliff probe's records
                    continue
                try:
                    by_step[int(row["step"])] = {str(pid): (int(c), g, int(row["num_samples"])) for pid, c, g in
                                                 zip(row["ids"], row["num_correct"], row["greedy"], strict=True)}
                except (KeyError, TypeError, ValueError) as err:
                    logger.warning("%s: row %d: bad record (%s); skipped", path, i, err)
            if not by_step:
                continue
            steps = sorted(by_step)
            ids = sorted(set.intersection(*(set(by_step[s]) for s in steps)))
            if not ids:
                continue
            scores = {}
            for metric in val_metrics(cfg):
                scores[metric] = np.stack([problem_scores([by_step[s][p][0] for p in ids],
                                                          [by_step[s][p][1] for p in ids],
                                                          by_step[s][ids[0]][2], metric) for s in steps])
            out[(method, int(seed))] = RunScores(steps, ids, scores)
    return out


def heldout_halves(ids: list[str], seed: int = 0) -> tuple[list[int], list[int]]:
    """Positions of the selection half and the report half of sorted problem ids (a seeded, fixed split)."""
    perm = np.random.default_rng(seed).permutation(len(ids))
    half = len(ids) // 2
    return sorted(perm[:half].tolist()), sorted(perm[half:].tolist())


def best_candidates(steps: list[int], include_step0: bool, last_step: Optional[int] = None) -> list[int]:
    """Positions of the validation `steps` a best-over-training selection may pick: the trained steps, and step
    0 too with `include_step0` (eval.best_includes_step0) or in a run of 0 steps, as the trainer counts.
    `last_step`: the run's last validation (default: the last of `steps`)."""
    last = (steps[-1] if steps else 0) if last_step is None else last_step
    return [i for i, s in enumerate(steps) if include_step0 or last == 0 or s != 0]


def select(matrix: np.ndarray, selection: str, halves: tuple[list[int], list[int]],
           candidates: Optional[list[int]] = None, steps: Optional[list[int]] = None,
           last_step: Optional[int] = None) -> Optional[tuple[int, list[int]]]:
    """-> (step position, problem positions to report) for one run's [T, P] matrix; best and held-out pick
    among the `candidates` step positions (default: all). `final` is the last row only when it is the run's
    configured last step (`last_step`, with the rows' `steps`): an unfinished run has no final (None), so it
    is never compared with finished runs at another step."""
    all_p = list(range(matrix.shape[1]))
    cand = list(range(matrix.shape[0])) if candidates is None else candidates
    if selection == "final":
        if last_step is not None and (not steps or steps[-1] != last_step):
            return None
        return matrix.shape[0] - 1, all_p
    if selection == "best":  # argmax: the first (earliest) maximum
        return cand[int(np.argmax(np.nanmean(matrix[cand], axis=1)))], all_p
    if selection == "held-out":
        pick, report = halves
        return cand[int(np.argmax(np.nanmean(matrix[cand][:, pick], axis=1)))], report
    if selection == "step 0":
        return 0, all_p
    raise ValueError(f"unknown selection {selection!r}")


def final_step(cfg: Config, method: str) -> int:
    """The step a run of `method` ends at (grpo.max_num_steps, after the method's own settings): its final
    validation."""
    return run_config(cfg, method).grpo.max_num_steps


def _selected(scores: dict[tuple[str, int], RunScores], method: str, metric: str, selection: str,
              include_step0: bool, ids: Optional[list[str]] = None, last_step: Optional[int] = None
              ) -> tuple[dict[int, np.ndarray], dict[int, int], list[str]]:
    """Per seed of `method`: the selected step's scores on the report problems (restricted to `ids`); a seed
    whose run has not reached `last_step` has no final (left out, with a warning)."""
    vecs, steps = {}, {}
    runs = {s: r for (m, s), r in scores.items() if m == method}
    if not runs:
        return {}, {}, []
    common = sorted(set.intersection(*(set(r.ids) for r in runs.values())) & (set(ids) if ids else set.union(
        *(set(r.ids) for r in runs.values()))))
    halves = heldout_halves(common)
    report_ids = common
    for seed, run in runs.items():
        pos = [run.ids.index(p) for p in common]
        mat = run.scores[metric][:, pos]
        picked = select(mat, selection, halves, best_candidates(run.steps, include_step0), run.steps, last_step)
        if picked is None:
            logger.warning("%s: last validation at step %d, not the configured last step %s: no final",
                           run_name(method, seed), run.steps[-1], last_step)
            continue
        t, report = picked
        report_ids = [common[i] for i in report]
        vecs[seed], steps[seed] = mat[t, report], run.steps[t]
    return vecs, steps, report_ids


def interval_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """Per method, selection and metric: the mean over problems (and seeds) with a 95% interval; the
    untrained model as the method `base` (validation at step 0 of the baseline's runs)."""
    scores = val_scores(cfg, results_dir)
    records = []
    base_from = baseline_of(cfg) or (cfg.experiment.methods[0] if cfg.experiment.methods else None)
    plan = [(m, s) for m in cfg.experiment.methods for s in INTERVAL_SELECTIONS]
    plan += [(BASE, "step 0")] if base_from else []
    for method, selection in plan:
        for metric in val_metrics(cfg):
            src = base_from if method == BASE else method
            vecs, steps, _ = _selected(scores, src, metric, selection, cfg.eval.best_includes_step0,
                                       last_step=final_step(cfg, src))
            if not vecs or any(np.isnan(v).any() for v in vecs.values()):
                continue
            seeds = sorted(vecs)
            if method == BASE:
                seeds = seeds[:1]  # the same untrained model whatever the seed
            iv = mean_interval(np.stack([vecs[s] for s in seeds]), bounds=RATE)
            records.append({"method": method, "selection": selection, "metric": metric, "estimate": iv.estimate,
                            "low": iv.low, "high": iv.high, "n_problems": iv.n_problems, "n_seeds": iv.n_seeds,
                            "steps": "/".join(str(steps[s]) for s in seeds), "scope": iv.scope})
    return pd.DataFrame.from_records(records, columns=INTERVAL_COLUMNS)


def _paired(scores: dict[tuple[str, int], RunScores], cfg: Config, method: str, base: str, selection: str,
            metric: str) -> Optional[Interval]:
    """method − base at one selection and metric, paired by problem (those every run of both has) and by seed
    (those both have at that selection); None without any pair."""
    common = None
    for m in (method, base):
        runs = [r for (mm, _), r in scores.items() if mm == m]
        ids = set.intersection(*(set(r.ids) for r in runs)) if runs else set()
        common = ids if common is None else common & ids
    if not common:
        return None
    step0 = cfg.eval.best_includes_step0
    a, _, _ = _selected(scores, method, metric, selection, step0, sorted(common), final_step(cfg, method))
    b, _, _ = _selected(scores, base, metric, selection, step0, sorted(common), final_step(cfg, base))
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    A, B = np.stack([a[s] for s in seeds]), np.stack([b[s] for s in seeds])
    if np.isnan(A).any() or np.isnan(B).any():
        return None
    return paired_difference(A, B)


def difference_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """Every method minus the baseline (GRPO), paired by problem and seed, per selection and metric: mean
    difference, 95% interval and p-value (hdpo.stats.paired_difference); beside the paper's method − GRPO."""
    scores = val_scores(cfg, results_dir)
    base = baseline_of(cfg)
    records = []
    if base is None:
        return pd.DataFrame(columns=DIFF_COLUMNS)
    for method in cfg.experiment.methods:
        if method == base:
            continue
        for selection in INTERVAL_SELECTIONS:
            for metric in val_metrics(cfg):
                iv = _paired(scores, cfg, method, base, selection, metric)
                if iv is None:
                    continue
                paper = {}
                for source in SOURCES:
                    pm, pb = paper_value(source, method, metric), paper_value(source, base, metric)
                    paper[source] = pm - pb if pm is not None and pb is not None else math.nan
                records.append({"method": method, "baseline": base, "selection": selection, "metric": metric,
                                "estimate": iv.estimate, "low": iv.low, "high": iv.high, "p_value": iv.p_value,
                                "n_problems": iv.n_problems, "n_seeds": iv.n_seeds, "scope": iv.scope,
                                "paper_h200": paper.get("paper_h200", math.nan),
                                "paper_h100": paper.get("paper_h100", math.nan)})
    return pd.DataFrame.from_records(records, columns=DIFF_COLUMNS)


def claim_power(claim: Claim, iv: Interval, n_problems: int = POWER_PROBLEMS) -> dict:
    """What our runs could detect and what a claim would take, from the variance components of our paired
    differences (`iv.components`): for a directional claim the seeds for 80% power at alpha 0.05 to detect the
    paper's effect on `n_problems`, our design's minimum detectable effect and its power for the paper's
    effect; for an equivalence claim the same for showing |difference| < the margin when the truth is the
    paper's effect, and the narrowest margin our design can show. With one seed the seed variance is unknown
    and taken as 0, so the seeds needed are a lower bound (seeds_note says so)."""
    c = iv.components
    effect = claim_effect(claim)
    if claim.direction == 0:
        need = seeds_for_equivalence(effect, EQUIVALENCE_MARGIN, c, n_problems)
        ours = equivalence_power(effect, EQUIVALENCE_MARGIN, c, iv.n_seeds, iv.n_problems)
        mde = minimum_equivalence_margin(c, iv.n_seeds, iv.n_problems)
    else:
        need = seeds_for_power(effect, c, n_problems)
        ours = power(effect, c, iv.n_seeds, iv.n_problems)
        mde = minimum_detectable_effect(c, iv.n_seeds, iv.n_problems)
    note = ("lower bound: one seed, seed variance unknown (taken as 0)" if not c.seeds_counted else
            f"from {iv.n_seeds} seeds' variance components")
    if need is None:
        note = "more than 1000 seeds; " + note
    return {"paper_effect": effect, "seeds_needed": need, "seeds_note": note, "power_ours": ours, "mde": mde}


def claims_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """One row per (paper claim, selection): the paper's difference to GRPO in each table and its range, ours
    (paired estimate, 95% interval, p-value, scope), the verdict (hdpo.stats.claim_verdict) and the power rows
    (claim_power). A claim whose method or GRPO is not in the grid, or has no paired records, is 'not tested'."""
    scores = val_scores(cfg, results_dir)
    methods = set(cfg.experiment.methods)
    records = []
    for claim in PAPER_CLAIMS:
        diffs = claim_differences(claim)
        lo_p, hi_p = claim_range(claim)
        # a metric the runs did not record (e.g. pass@8 with eval.pass_k [1, 2, 4]) leaves the claim untested
        recorded = all(claim.metric in r.scores for (m, _), r in scores.items() if m in (claim.method, BASELINE))
        for selection in INTERVAL_SELECTIONS:
            iv = (_paired(scores, cfg, claim.method, BASELINE, selection, claim.metric)
                  if {claim.method, BASELINE} <= methods and recorded else None)
            margin = EQUIVALENCE_MARGIN if claim.direction == 0 else math.nan
            rec = {"claim": claim.text, "key": claim.key, "method": claim.method, "metric": claim.metric,
                   "direction": claim.direction, "paper_h200": diffs.get("paper_h200", math.nan),
                   "paper_h100": diffs.get("paper_h100", math.nan), "paper_low": lo_p, "paper_high": hi_p,
                   "margin": margin, "selection": selection, "note": claim.note}
            if iv is None:
                verdict, reason = claim_verdict(math.nan, math.nan, claim.direction, (lo_p, hi_p), margin)
                if not recorded:
                    reason = f"{claim.metric} not evaluated (not in eval.pass_k, or above eval.num_samples)"
                rec.update({"verdict": verdict, "reason": reason, "paper_effect": claim_effect(claim)})
            else:
                verdict, reason = claim_verdict(iv.low, iv.high, claim.direction, (lo_p, hi_p), margin)
                rec.update({"estimate": iv.estimate, "low": iv.low, "high": iv.high, "p_value": iv.p_value,
                            "n_seeds": iv.n_seeds, "n_problems": iv.n_problems, "scope": iv.scope,
                            "verdict": verdict, "reason": reason, **claim_power(claim, iv)})
            records.append(rec)
    frame = pd.DataFrame.from_records(records, columns=CLAIM_COLUMNS)
    for col in ("n_seeds", "n_problems", "seeds_needed"):
        frame[col] = frame[col].astype("Int64")
    return frame


def _eval_path(results_dir: Path, method: str, seed, ckpt: str, bench: str) -> Path:
    if method == BASE:
        return results_dir / "eval" / BASE / f"{bench}.json"
    return results_dir / "eval" / run_name(method, seed) / ckpt / f"{bench}.json"


def bench_interval_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """Per method (and the untrained model), checkpoint, benchmark and metric: the mean over problems (and
    seeds) with a 95% interval, from the per-problem samples; `steps` = the model step of each seed's
    checkpoint, `untrained` = every seed's checkpoint is the step-0 model."""
    results_dir = Path(results_dir)
    records = []
    plan = [(BASE, [None], "base")] + [(m, list(cfg.experiment.seeds), c) for m in cfg.experiment.methods
                                       for c in cfg.experiment.checkpoints]
    for bench in cfg.experiment.benchmarks:
        for method, seeds, ckpt in plan:
            per_seed = {}
            for seed in seeds:
                path = _eval_path(results_dir, method, seed, ckpt, bench)
                meta = _read_json(path)
                recs = read_records(samples_path(path))
                if meta is None or not recs:
                    continue
                per_seed[seed] = (meta, {str(r.get("id")): r for r in recs})
            if not per_seed:
                continue
            ids = sorted(set.intersection(*(set(r) for _, r in per_seed.values())))
            for metric in val_metrics(cfg):
                rows = []
                for seed, (meta, recs) in per_seed.items():
                    n = int(meta.get("num_samples") or len(recs[ids[0]].get("samples", [])) or 1)
                    rows.append(problem_scores([recs[p].get("num_correct", 0) for p in ids],
                                               [(recs[p].get("greedy") or {}).get("reward") for p in ids], n, metric))
                mat = np.stack(rows)
                if np.isnan(mat).any() or mat.size == 0:
                    continue
                iv = mean_interval(mat, bounds=RATE)
                steps = [_opt_int(meta.get("model_step")) for meta, _ in per_seed.values()]
                records.append({"method": method, "checkpoint": ckpt, "benchmark": bench, "metric": metric,
                                "estimate": iv.estimate, "low": iv.low, "high": iv.high, "n_problems": iv.n_problems,
                                "n_seeds": iv.n_seeds, "steps": "/".join("?" if s is None else str(s) for s in steps),
                                "untrained": method == BASE or all(s == 0 for s in steps), "scope": iv.scope})
    return pd.DataFrame.from_records(records, columns=BENCH_INTERVAL_COLUMNS)


def probe_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """The cliff probe per run and validation step: former cliffs probed, the fraction solved (at least one of
    n plain-prompt samples correct) and their mean pass@1."""
    records = []
    for method in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            path = Path(results_dir) / "runs" / run_name(method, seed) / "val_problems.jsonl.gz"
            for row in read_records(path):
                if row.get("set") != "cliff_probe":
                    continue
                try:
                    c, n = [int(x) for x in row["num_correct"]], int(row["num_samples"])
                    records.append({"method": method, "seed": int(seed), "step": int(row["step"]),
                                    "probed": len(c), "solved": sum(x > 0 for x in c) / len(c),
                                    "pass@1": sum(c) / (n * len(c))})
                except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
                    logger.warning("%s: bad cliff-probe record (%s); skipped", path, err)
    return pd.DataFrame.from_records(records, columns=["method", "seed", "step", "probed", "solved", "pass@1"])


def ledger_frame(cfg: Config, results_dir: str | Path) -> pd.DataFrame:
    """The cliff ledgers of every run: one row per (method, seed, step, prompt)."""
    records = []
    for method in cfg.experiment.methods:
        for seed in cfg.experiment.seeds:
            for row in read_records(Path(results_dir) / "runs" / run_name(method, seed) / "cliffs.jsonl"):
                try:
                    tail = row.get("teacher_tail_mass") or {}
                    records.append({"method": method, "seed": int(seed), "step": int(row["step"]),
                                    "index": int(row["index"]), "reward_sum": float(sum(row["rewards"])),
                                    "cliff": bool(row["cliff"]), "distilled": bool(row["distilled"]),
                                    "generated": int(row["privileged_generated"]),
                                    "kept": int(row["privileged_kept"]),
                                    "reinjected": row.get("reinjected_from") is not None,
                                    "tail_mean": _number(tail.get("mean")), "tail_p90": _number(tail.get("p90"))})
                except (KeyError, TypeError, ValueError) as err:
                    logger.warning("%s cliffs.jsonl: bad row (%s); skipped", run_name(method, seed), err)
    cols = ["method", "seed", "step", "index", "reward_sum", "cliff", "distilled", "generated", "kept",
            "reinjected", "tail_mean", "tail_p90"]
    return pd.DataFrame.from_records(records, columns=cols)
