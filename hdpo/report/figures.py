"""Figures (PNG and PDF each, one style file, hdpo/plot_style.mplstyle), from aggregated result files only.

  val_passk       validation pass@k over training per method (mean over seeds, band ± 1 std)
  training        reward, GRPO and JSD losses, kept privileged rollouts, response length, sampler-vs-trainer
                  log-prob gap over training; mean time per phase of a step
  cliffs          cliff fraction and teacher pass rate over training
  cliff_recovery  former cliffs solved when met again (the control: GRPO), and the teacher's top-k tail mass
  passk_curve     pass@k against k (best and final step) with 95% intervals
  lambda_sweep    accuracy against lambda (GRPO at lambda = 0), per teacher, with intervals and the paper's points
  forest          each method's difference to GRPO with its 95% paired interval, beside the paper's difference
  claims          each claim of the paper: our interval (best; final and held-out beside it) against the paper's
                  range (or the equivalence margin), coloured by verdict
  benchmarks      benchmark bars per method and checkpoint (the untrained model included; a zero drawn as a zero)
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from hdpo.config import Config
from hdpo.io import atomic_path
from hdpo.layout import FIGURE_NAMES
from hdpo.paper import SOURCES, paper_value
from hdpo.report.frames import (INTERVAL_SELECTIONS, bench_interval_frame, benchmarks_frame, claims_frame,
                                difference_frame,
                                interval_frame, ledger_frame, probe_frame, summarize, train_frame, val_frame)
from hdpo.stats import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, PROBLEMS_ONLY, SUPPORTED
from hdpo.report.names import (BASE, baseline_of, benchmark_label, method_label, method_short, method_styles,
                               methods_of, metric_label)

STYLE_FILE = Path(__file__).resolve().parent.parent / "plot_style.mplstyle"
SINGLE_COLUMN_IN = 3.5
DOUBLE_COLUMN_IN = 7.0
SELECTION_MARKERS = {"best": "o", "final": "s", "held-out": "D"}
TEACHER_COLORS = {"frozen": "#0072B2", "drifting": "#D55E00"}
CHECKPOINT_HATCHES = ["", "////", "..", "xx"]  # a method's checkpoints, in the order of experiment.checkpoints
CHECKPOINT_ALPHAS = [1.0, 0.55, 0.35, 0.25]


def _no_data(ax, text: str = "no results yet") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=7)


def save_figure(fig, out_dir: Path, name: str) -> list[Path]:
    """<name>.png and <name>.pdf of `fig` under out_dir, each written atomically."""
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext)
        paths.append(path)
    return paths


def _mean_band(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Mean and std over seeds per step."""
    g = frame.groupby("step")[value]
    return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()}).reset_index()


def _legend_below(fig, methods, styles, ncol: int) -> None:
    handles = [Line2D([], [], color=styles[m]["color"], linestyle=styles[m]["linestyle"]) for m in methods]
    fig.legend(handles, [method_label(m) for m in methods], loc="lower center", ncol=ncol,
               bbox_to_anchor=(0.5, 0.0))


def _fig_val_passk(cfg: Config, results_dir: Path):
    val = val_frame(cfg, results_dir)
    ks = [f"pass@{k}" for k in cfg.eval.pass_k]
    methods = list(cfg.experiment.methods)
    styles = method_styles(cfg)
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 2.55), layout="constrained")
    axes = fig.subplots(1, len(ks), sharex=True, squeeze=False)[0]
    for ax, metric in zip(axes, ks):
        sub = val[val["metric"] == metric]
        for method in methods:
            mine = sub[sub["method"] == method]
            if mine.empty:
                continue
            band = _mean_band(mine, "value")
            ax.plot(band["step"], band["mean"], **styles[method], label=method_label(method),
                    marker="o" if len(band) <= 25 else None, markersize=2.5)
            if (band["n"] > 1).any():
                ax.fill_between(band["step"], band["mean"] - band["std"].fillna(0), band["mean"] + band["std"].fillna(0),
                                color=styles[method]["color"], alpha=0.15, linewidth=0)
        if sub.empty:
            _no_data(ax)
        ax.set_title(f"validation {metric}")
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("pass@k (mean over problems)")
    n_seeds = len(cfg.experiment.seeds)
    _legend_below(fig, methods, styles, ncol=min(len(methods), 5))
    fig.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))
    if n_seeds > 1:
        fig.suptitle(f"mean over {n_seeds} seeds, band ± 1 std", fontsize=7, color="0.3")
    return fig


def _smooth(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(window, min_periods=1, center=False).mean()


def _fig_cliffs(cfg: Config, results_dir: Path):
    train = train_frame(cfg, results_dir, ["cliff_fraction", "teacher_pass_rate"])
    methods = list(cfg.experiment.methods)
    styles = method_styles(cfg)
    n_steps = int(train["step"].max()) + 1 if not train.empty else 0
    window = max(1, round(n_steps / 50))
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 2.55), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, squeeze=False)[0]
    panels = [("cliff_fraction", "cliff prompts", "fraction of the step's prompts\nwith all K rewards 0"),
              ("teacher_pass_rate", "teacher pass rate on cliff prompts",
               "privileged rollouts verified\ncorrect (fraction)")]
    for ax, (key, title, ylabel) in zip(axes, panels):
        drawn = False
        for method in methods:
            mine = train[(train["method"] == method)].dropna(subset=[key])
            if mine.empty:
                continue
            smoothed = []
            for _, run in mine.groupby("seed"):
                run = run.sort_values("step")
                smoothed.append(pd.DataFrame({"step": run["step"], "v": _smooth(run[key], window).to_numpy()}))
            band = _mean_band(pd.concat(smoothed), "v")
            ax.plot(band["step"], band["mean"], **styles[method])
            drawn = True
        if not drawn:
            _no_data(ax, "no results yet" if train.empty else "no privileged rollouts")
        ax.set_title(title)
        ax.set_xlabel("training step" + (f" (moving average over {window} steps)" if window > 1 else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
    _legend_below(fig, methods, styles, ncol=min(len(methods), 5))
    fig.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))
    return fig




def _run_lines(ax, frame: pd.DataFrame, key: str, methods, styles, window: int, scale: float = 1.0) -> bool:
    """Per method: each seed smoothed over `window` steps, then the mean over seeds; False if nothing drawn."""
    drawn = False
    for method in methods:
        mine = frame[frame["method"] == method].dropna(subset=[key])
        if mine.empty:
            continue
        parts = [pd.DataFrame({"step": run["step"], "v": _smooth(run.sort_values("step")[key] * scale, window)
                               .to_numpy()}) for _, run in mine.groupby("seed")]
        band = _mean_band(pd.concat(parts), "v")
        ax.plot(band["step"], band["mean"], **styles[method], marker="o" if len(band) <= 12 else None,
                markersize=2.5)
        drawn = True
    return drawn


PHASES = ("rollout", "reward", "privileged", "teacher", "update")


def _fig_training(cfg: Config, results_dir: Path):
    keys = ["reward/mean", "loss/grpo", "loss/jsd", "privileged/kept", "tokens/grpo",
            "logprob/sampler_vs_trainer_abs_diff"] + [f"time/{p}" for p in PHASES]
    train = train_frame(cfg, results_dir, keys)
    methods = list(cfg.experiment.methods)
    styles = method_styles(cfg)
    n_steps = int(train["step"].max()) if not train.empty else 0
    window = max(1, round(n_steps / 50))
    rollouts = cfg.grpo.num_prompts_per_step * cfg.grpo.num_generations_per_prompt
    panels = [("reward/mean", "reward (plain prompt)", "mean reward", 1.0),
              ("loss/grpo", "GRPO loss", "L_GRPO / N_grpo", 1.0),
              ("loss/jsd", "JSD loss (cliff prompts)", "L_JSD / N_distill", 1.0),
              ("privileged/kept", "kept privileged rollouts", "rollouts per step", 1.0),
              ("tokens/grpo", "response length", "tokens per rollout", 1.0 / rollouts),
              ("logprob/sampler_vs_trainer_abs_diff", "sampler vs trainer", "mean |Δ log p| per token", 1.0),
              ("time", "time per phase", "", 1.0)]
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 4.6), layout="constrained")
    axes = fig.subplots(2, 4).ravel()
    for ax, (key, title, ylabel, scale) in zip(axes, panels):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if key == "time":
            handles = _time_bars(ax, train, methods, styles)
            axes[-1].legend(handles=handles, title="time per phase", fontsize=6, title_fontsize=6,
                            loc="center left", frameon=False)  # in the free eighth panel
            continue
        if not _run_lines(ax, train, key, methods, styles, window, scale):
            _no_data(ax, "no results yet" if train.empty else "not measured")
        ax.set_xlabel("training step" + (f" (avg. over {window})" if window > 1 else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if n_steps:  # the run's whole step range, also when a panel has a single point
            ax.set_xlim(0.5, n_steps + 0.5)
    axes[-1].axis("off")
    _legend_below(fig, methods, styles, ncol=min(len(methods), 5))
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    return fig


def _time_bars(ax, train: pd.DataFrame, methods, styles) -> list:
    """Stacked mean seconds per phase, one horizontal bar per method (room for the methods' names; the
    phases' grey levels are the legend)."""
    shades = ["0.15", "0.35", "0.55", "0.75", "0.9"]
    y = np.arange(len(methods))[::-1]  # the grid's first method on top
    drawn, handles = False, []
    left = np.zeros(len(methods))
    for phase, shade in zip(PHASES, shades):
        col = f"time/{phase}"
        vals = np.array([train.loc[train["method"] == m, col].mean() if (train["method"] == m).any() else 0.0
                         for m in methods])
        vals = np.nan_to_num(vals)
        if vals.any():
            drawn = True
        label = "rollout (+ privileged in the same loop)" if phase == "rollout" else phase
        handles.append(ax.barh(y, vals, 0.7, left=left, color=shade, linewidth=0.8, label=label,
                               edgecolor=[styles[m]["color"] for m in methods]))
        left += vals
    if not drawn:
        _no_data(ax)
    ax.set_yticks(y, [textwrap.fill(method_short(m).replace("\n", " "), 16) for m in methods], fontsize=5)
    ax.set_xlabel("seconds per step (mean)")
    ax.grid(axis="y", visible=False)
    return handles


def _fig_cliff_recovery(cfg: Config, results_dir: Path):
    ledger = ledger_frame(cfg, results_dir)
    methods = list(cfg.experiment.methods)
    styles = method_styles(cfg)
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 2.9), layout="constrained")
    ax_probe, ax_bar, ax_cum, ax_tail = fig.subplots(1, 4)
    _cliff_probe_panel(ax_probe, probe_frame(cfg, results_dir), methods, styles)
    _met_again_panel(ax_bar, ledger, methods, styles)
    _distilled_panel(ax_cum, ledger, methods, styles)
    _tail_mass_panel(ax_tail, ledger, methods, styles, cfg.hdpo.topk_logits_k)
    _legend_below(fig, methods, styles, ncol=min(len(methods), 5))
    fig.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))
    return fig


def _cliff_probe_panel(ax, probe: pd.DataFrame, methods, styles) -> None:
    """The cliff probe: the run's earliest former cliffs, sampled with the plain prompt at each validation."""
    drawn = False
    for m in methods:
        mine = probe[probe["method"] == m]
        if mine.empty:
            continue
        band = _mean_band(mine.rename(columns={"solved": "v"}), "v")
        ax.plot(band["step"], band["mean"], **styles[m], marker="o", markersize=3)
        drawn = True
    if not drawn:
        _no_data(ax, "no cliff probe\n(eval.cliff_probe_problems = 0)")
    ax.set_title("probe: cliffs solved now")
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction with a correct\nplain-prompt sample")
    ax.set_ylim(-0.02, 1.02)
    lo, hi = ax.get_xlim()
    if drawn and hi - lo < 2:  # one validation step: room for integer ticks around it
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _recovery_counts(ledger: pd.DataFrame) -> tuple[int, int, int]:
    """Former cliffs, those met again at a later step with the plain prompt, and those solved then: summed over
    the seeds' runs in `ledger`."""
    former = met = solved = 0
    for _, run in ledger.groupby("seed"):
        first_cliff: dict = {}
        met_again, solved_again = set(), set()
        for r in run.sort_values("step").itertuples(index=False):
            if r.index in first_cliff and r.step > first_cliff[r.index]:
                met_again.add(r.index)
                if r.reward_sum > 0:
                    solved_again.add(r.index)
            if r.cliff and r.index not in first_cliff:
                first_cliff[r.index] = r.step
        former, met, solved = former + len(first_cliff), met + len(met_again), solved + len(solved_again)
    return former, met, solved


def _met_again_panel(ax, ledger: pd.DataFrame, methods, styles) -> None:
    """Former cliffs met again later with the plain prompt (hollow bars), and how many were solved then."""
    counts = [_recovery_counts(ledger[ledger["method"] == m]) for m in methods]
    former, met, solved = ([c[i] for c in counts] for i in range(3))
    x = np.arange(len(methods))
    colors = [styles[m]["color"] for m in methods]
    ax.bar(x, met, 0.7, color="white", edgecolor=colors, linewidth=1.0, label="met again")
    ax.bar(x, solved, 0.7, color=colors, label="solved then")
    for i in range(len(methods)):
        ax.text(x[i], max(met[i], 0) + 0.02 * max(1, max(met or [1])), f"{solved[i]}/{met[i]}\nof {former[i]}",
                ha="center", va="bottom", fontsize=5)
    if ledger.empty:
        _no_data(ax)
    elif not any(met):
        _no_data(ax, "no former cliff met again\n(none re-drawn or re-injected)")
    if len(methods) > 3:  # a narrow panel: upright one-line labels, or they run into each other
        ax.set_xticks(x, [method_short(m).replace("-\n", "-").replace("\n", " ") for m in methods],
                      fontsize=5, rotation=90)
    else:
        ax.set_xticks(x, [method_short(m) for m in methods], fontsize=5)
    ax.set_ylim(0, max(1, max(met or [0])) * 1.35)
    ax.set_title("met again / solved")
    ax.set_ylabel("prompts (all seeds)")
    ax.legend(fontsize=5, frameon=False, loc="upper left")
    ax.grid(axis="x", visible=False)


def _distilled_panel(ax, ledger: pd.DataFrame, methods, styles) -> None:
    """Distilled cliffs accumulated over training (the expansion), per method."""
    drawn = False
    for m in methods:
        mine = ledger[ledger["method"] == m]
        if mine.empty:
            continue
        per_step = mine.groupby(["seed", "step"])["distilled"].sum().groupby("step").mean().sort_index()
        ax.plot(per_step.index, per_step.cumsum().to_numpy(), **styles[m])
        drawn = True
    if not drawn:
        _no_data(ax)
    ax.set_title("distilled cliffs")
    ax.set_xlabel("training step")
    ax.set_ylabel("prompts, cumulative\n(mean over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _tail_mass_panel(ax, ledger: pd.DataFrame, methods, styles, topk: int) -> None:
    """The teacher's mass outside its top-k on kept tokens, per distilled prompt (ECDF)."""
    drawn = False
    for m in methods:
        vals = np.sort(ledger.loc[ledger["method"] == m, "tail_mean"].dropna().to_numpy())
        if vals.size == 0:
            continue
        ax.step(vals, np.arange(1, vals.size + 1) / vals.size, where="post", **styles[m])
        drawn = True
    if not drawn:
        _no_data(ax, "no kept privileged rollouts")
    ax.set_title(f"mass outside top-{topk}")
    ax.set_xlabel("mean tail mass per prompt")
    ax.set_ylabel("fraction of prompts (ECDF)")


def _errorbar(ax, x, y, low, high, **kw):
    yerr = None
    if math.isfinite(low) and math.isfinite(high):
        yerr = [[max(0.0, y - low)], [max(0.0, high - y)]]
    ax.errorbar([x], [y], yerr=yerr, elinewidth=0.8, capsize=1.5, linestyle="none", **kw)


def _fig_passk_curve(cfg: Config, results_dir: Path):
    iv = interval_frame(cfg, results_dir)
    methods = list(cfg.experiment.methods)
    styles = method_styles(cfg)
    ks = list(cfg.eval.pass_k)
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 2.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, selection in zip(axes, ("best", "final")):
        drawn = False
        rows = [(BASE, "step 0")] + [(m, selection) for m in methods]
        for j, (method, sel) in enumerate(rows):
            sub = iv[(iv["method"] == method) & (iv["selection"] == sel)]
            pts = [(k, sub[sub["metric"] == f"pass@{k}"]) for k in ks]
            pts = [(k, r.iloc[0]) for k, r in pts if not r.empty]
            if not pts:
                continue
            drawn = True
            off = (j - len(rows) / 2) * 0.015  # a small offset so the intervals do not hide each other
            xs = [k * (1 + off) for k, _ in pts]
            ax.plot(xs, [r["estimate"] for _, r in pts], **styles[method], marker="o", markersize=3)
            for xk, (_, r) in zip(xs, pts):
                _errorbar(ax, xk, r["estimate"], r["low"], r["high"], color=styles[method]["color"])
        if not drawn:
            _no_data(ax, "no per-problem validation records yet")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (samples per problem)")
        ax.set_title(f"validation pass@k, {selection} step" + (" (optimistic)" if selection == "best" else ""))
    axes[0].set_ylabel("pass@k [95% interval]")
    _legend_below(fig, [BASE] + methods, styles, ncol=min(len(methods) + 1, 6))
    fig.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))
    return fig


def _fig_lambda_sweep(cfg: Config, results_dir: Path):
    """Accuracy against lambda: one line per teacher from GRPO (lambda = 0), at the final step with its interval
    (filled) and the optimistic best (hollow); the paper's best as crosses."""
    iv = interval_frame(cfg, results_dir)
    specs = methods_of(cfg)
    base = baseline_of(cfg)
    ks = [f"pass@{k}" for k in cfg.eval.pass_k]
    metrics = [ks[0]] + ([ks[-1]] if len(ks) > 1 else []) + (["greedy_acc"] if cfg.eval.greedy else [])
    lambdas = sorted({s["distill_weight"] for s in specs.values() if s["distill_weight"] is not None})
    pos = {lam: i for i, lam in enumerate(lambdas)}
    teachers = sorted({s["teacher"] for s in specs.values() if s["teacher"]})
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 2.6), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        drawn = False
        for t_i, teacher in enumerate(teachers):
            members = [m for m, s in specs.items() if s["teacher"] == teacher] + ([base] if base else [])
            members.sort(key=lambda m: specs[m]["distill_weight"])
            off = (t_i - (len(teachers) - 1) / 2) * 0.08  # the teachers side by side at each lambda
            points = [(m, pos[specs[m]["distill_weight"]] + off) for m in members]
            color = TEACHER_COLORS.get(teacher, "0.4")
            drawn |= _lambda_lines(ax, iv, metric, points, color)
            _paper_points(ax, metric, points, color)
        if not drawn:
            _no_data(ax, "no per-problem validation records yet")
        ax.set_xticks(range(len(lambdas)), [f"{lam:g}" for lam in lambdas])
        ax.set_xlim(-0.5, len(lambdas) - 0.5)
        ax.set_xlabel("λ (distill_weight; 0 = GRPO)")
        ax.set_title(f"validation {metric_label(metric)}")
    axes[0].set_ylabel("accuracy [95% interval]")
    _lambda_legend(fig, teachers)
    return fig


def _lambda_lines(ax, iv: pd.DataFrame, metric: str, points, color) -> bool:
    """One teacher's methods at their x (`points`: (method, x)): the final step filled on a solid line, the best
    step hollow on a dotted one, each with its interval; False if none has a value."""
    drawn = False
    for sel, filled in (("final", True), ("best", False)):
        xs, ys = [], []
        for m, x in points:
            r = iv[(iv["method"] == m) & (iv["selection"] == sel) & (iv["metric"] == metric)]
            if r.empty:
                continue
            r = r.iloc[0]
            xs.append(x)
            ys.append(r["estimate"])
            _errorbar(ax, x, r["estimate"], r["low"], r["high"], color=color, marker="o", markersize=3.5,
                      markerfacecolor=color if filled else "white")
        if xs:
            drawn = True
            ax.plot(xs, ys, color=color, linestyle="-" if filled else ":", linewidth=0.9)
    return drawn


def _paper_points(ax, metric: str, points, color) -> None:
    """The paper's values of the methods at their x (`points`: (method, x)), one marker per source."""
    for m, x in points:
        for source, mk in zip(SOURCES, ("x", "+")):
            v = paper_value(source, m, metric)
            if v is not None:
                ax.plot(x, v, marker=mk, color=color, linestyle="none", markersize=4)


def _lambda_legend(fig, teachers) -> None:
    handles = [Line2D([], [], color=TEACHER_COLORS.get(t, "0.4"), marker="o") for t in teachers]
    handles += [Line2D([], [], color="0.3", marker="o", linestyle="-"),
                Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle=":"),
                Line2D([], [], color="0.3", marker="x", linestyle="none"),
                Line2D([], [], color="0.3", marker="+", linestyle="none")]
    labels = [f"{t} teacher" for t in teachers] + ["final step", "best step (optimistic)", "paper 8×H200",
                                                    "paper 8×H100"]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), bbox_to_anchor=(0.5, 0.0))
    fig.get_layout_engine().set(rect=(0, 0.1, 1, 0.9))


def _fig_forest(cfg: Config, results_dir: Path):
    """One row per method, one panel per metric: method − GRPO, paired, 95% interval, per selection; the paper's
    single-seed differences as hollow markers."""
    diffs = difference_frame(cfg, results_dir)
    base = baseline_of(cfg)
    methods = [m for m in cfg.experiment.methods if m != base]
    styles = method_styles(cfg)
    ks = [f"pass@{k}" for k in cfg.eval.pass_k]
    metrics = ks + (["greedy_acc"] if cfg.eval.greedy else [])
    height = 1.0 + 0.45 * max(1, len(methods))
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, height + 0.5), layout="constrained")
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    sel_off = {"best": -0.2, "final": 0.0, "held-out": 0.2}
    for ax, metric in zip(axes, metrics):
        ax.axvline(0, color="0.5", linewidth=0.8)
        drawn = False
        for i, m in enumerate(methods):
            y = len(methods) - 1 - i
            color = styles[m]["color"]
            for sel in INTERVAL_SELECTIONS:
                r = diffs[(diffs["method"] == m) & (diffs["selection"] == sel) & (diffs["metric"] == metric)]
                if r.empty:
                    continue
                r = r.iloc[0]
                drawn = True
                ax.errorbar([r["estimate"]], [y + sel_off[sel]],
                            xerr=[[r["estimate"] - r["low"]], [r["high"] - r["estimate"]]], color=color,
                            marker=SELECTION_MARKERS[sel], markersize=3, elinewidth=0.9, capsize=1.5,
                            linestyle="none")
            for source, mk in zip(SOURCES, ("^", "v")):
                pm, pb = paper_value(source, m, metric), paper_value(source, base, metric) if base else None
                if pm is not None and pb is not None:
                    ax.plot(pm - pb, y + 0.35, marker=mk, color=color, markerfacecolor="white", linestyle="none",
                            markersize=3.5)
        if not drawn:
            _no_data(ax, "no paired results yet")
        ax.set_title(f"Δ {metric_label(metric)}")
        ax.set_xlabel("method − GRPO")
    axes[0].set_yticks(range(len(methods)), [method_label(m) for m in reversed(methods)], fontsize=6)
    axes[0].set_ylim(-0.6, max(1, len(methods)) - 0.4)
    handles = [Line2D([], [], color="0.3", marker=SELECTION_MARKERS[s], linestyle="-") for s in INTERVAL_SELECTIONS]
    handles += [Line2D([], [], color="0.3", marker=mk, markerfacecolor="white", linestyle="none")
                for mk in ("^", "v")]
    labels = ["best step (optimistic)", "final step", "held-out step", "paper 8×H200", "paper 8×H100"]
    fig.legend(handles, labels, loc="lower center", ncol=5, bbox_to_anchor=(0.5, 0.0))
    fig.get_layout_engine().set(rect=(0, 0.4 / (height + 0.5), 1, 1 - 0.4 / (height + 0.5)))
    return fig


PAPER_COLOR = "#7B3294"  # the paper's numbers: a hue no verdict uses
VERDICT_COLORS = {SUPPORTED: "#009E73", CONTRADICTED: "#D55E00", INCONCLUSIVE: "#7F7F7F", NOT_TESTED: "#BBBBBB"}


def _fig_claims(cfg: Config, results_dir: Path):
    """A forest plot of the claims table, in points of pass@k: per claim the paper's range over its two tables
    (a grey bar; for "keeps" the ±margin band), our best-step 95% interval coloured by its verdict, and the
    final and held-out intervals below it, thinner, in their own verdicts' colours. A hollow marker: one seed
    (problems only)."""
    claims = claims_frame(cfg, results_dir)
    keys = list(dict.fromkeys(claims["key"]))
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, 0.9 + 0.42 * max(1, len(keys))), layout="constrained")
    ax = fig.subplots()
    ax.axvline(0, color="0.3", linewidth=0.8)
    offsets = {"best": 0.0, "final": -0.17, "held-out": -0.32}
    labels = []
    for i, key in enumerate(keys):
        y = len(keys) - 1 - i
        grp = claims[claims["key"] == key]
        first = grp.iloc[0]
        labels.append(textwrap.fill(first["claim"], 46))
        if first["direction"] == 0:
            ax.fill_betweenx([y - 0.4, y + 0.4], -100 * first["margin"], 100 * first["margin"], color="#CCE5DF",
                             linewidth=0)
        ax.fill_betweenx([y + 0.1, y + 0.2], 100 * first["paper_low"], 100 * first["paper_high"], color=PAPER_COLOR,
                         linewidth=0)
        ax.plot([100 * first["paper_h200"], 100 * first["paper_h100"]], [y + 0.15] * 2, linestyle="none",
                marker="|", color=PAPER_COLOR, markersize=6)
        for r in grp.itertuples(index=False):
            if r.verdict == NOT_TESTED or not math.isfinite(r.estimate):
                if r.selection == "best":
                    ax.text(0, y - 0.1, "not tested", ha="center", va="center", fontsize=6, color="0.5")
                continue
            best = r.selection == "best"
            color = VERDICT_COLORS[r.verdict]
            est, lo, hi = 100 * r.estimate, 100 * r.low, 100 * r.high
            ax.errorbar([est], [y + offsets[r.selection]], xerr=[[est - lo], [hi - est]], color=color,
                        marker=SELECTION_MARKERS[r.selection], markersize=4 if best else 2.5,
                        elinewidth=1.6 if best else 0.8, capsize=2 if best else 1, linestyle="none",
                        markerfacecolor="white" if r.scope == PROBLEMS_ONLY else color)
    ax.set_yticks(range(len(keys)), list(reversed(labels)), fontsize=6)
    ax.set_ylim(-0.6, max(1, len(keys)) - 0.4)
    ax.set_xlabel("method − GRPO, points of pass@k (95% interval)")
    if claims.empty or (claims["verdict"] == NOT_TESTED).all():
        _no_data(ax, "no paired results yet")
    handles = [Patch(color=VERDICT_COLORS[v]) for v in (SUPPORTED, CONTRADICTED, INCONCLUSIVE)]
    handles += [Line2D([], [], color="0.3", marker=SELECTION_MARKERS[s], linestyle="-", markersize=3)
                for s in INTERVAL_SELECTIONS]
    handles += [Patch(color=PAPER_COLOR), Patch(color="#CCE5DF")]
    names = [SUPPORTED, CONTRADICTED, INCONCLUSIVE, "ours, best step", "final step", "held-out step",
             "paper: range of H200, H100 (ticks)", "equivalence margin"]
    fig.legend(handles, names, loc="outside lower center", ncol=4, fontsize=6)
    return fig


def _fig_benchmarks(cfg: Config, results_dir: Path):
    """Bars per method and checkpoint (the untrained model first); error bars are 95% intervals where the
    per-problem samples exist, else ± 1 std over seeds; a value of exactly 0 gets a visible tick and a '0'."""
    tidy = benchmarks_frame(cfg, results_dir)
    ci = bench_interval_frame(cfg, results_dir)
    cells = _BenchCells(summarize(tidy, ["method", "benchmark", "checkpoint", "metric"]),
                        {(r.method, r.benchmark, r.checkpoint, r.metric): (r.estimate, r.low, r.high)
                         for r in ci.itertuples(index=False)},
                        _untrained_checkpoints(tidy, ci))
    methods = [BASE] + list(cfg.experiment.methods)
    styles = method_styles(cfg)
    benches = list(cfg.experiment.benchmarks) or ["(none)"]
    ckpts = list(cfg.experiment.checkpoints)
    metrics = _benchmark_metrics(cfg, tidy)
    height = 1.55 * len(metrics) + 0.7
    fig = Figure(figsize=(DOUBLE_COLUMN_IN, height), layout="constrained")
    axes = fig.subplots(len(metrics), len(benches), squeeze=False, sharex=True)
    for r, metric in enumerate(metrics):
        for c, bench in enumerate(benches):
            ax = axes[r][c]
            _benchmark_bars(ax, cells, methods, ckpts, bench, metric, styles)
            if r == 0:
                ax.set_title(benchmark_label(bench))
            if c == 0:
                ax.set_ylabel(f"{metric_label(metric)} (fraction)")
            ax.set_xticks(np.arange(len(methods)), [method_short(m) for m in methods])
            ax.set_xlim(-0.5, len(methods) - 0.5)
            ax.grid(axis="x", visible=False)
    for ax in axes[-1]:
        ax.tick_params(axis="x", labelsize=6)
    _checkpoint_legend(fig, cfg, ckpts, height)
    return fig


@dataclass(frozen=True)
class _BenchCells:
    """The benchmark results behind the bars, each keyed by (method, benchmark, checkpoint[, metric])."""
    over_seeds: dict  # mean and std over seeds (`summarize`)
    intervals: dict  # (estimate, low, high) where the per-problem samples exist
    untrained: set  # checkpoints that are the step-0 model

    def bar(self, key: tuple) -> Optional[tuple[float, Optional[list], float]]:
        """(height, error bar, top of the error bar), or None without a result."""
        cell = self.over_seeds.get(key)
        if cell is None:
            return None
        if key in self.intervals:
            est, lo, hi = self.intervals[key]
            return est, [[max(0.0, est - lo)], [max(0.0, hi - est)]], hi
        sd = cell.std if cell.n > 1 and not math.isnan(cell.std) else 0.0
        return cell.mean, [[sd], [sd]] if sd else None, cell.mean + sd


def _untrained_checkpoints(tidy: pd.DataFrame, ci: pd.DataFrame) -> set:
    """(method, benchmark, checkpoint) of the trained methods whose checkpoint is the step-0 model (a "best"
    that never improved)."""
    untrained = {(r.method, r.benchmark, r.checkpoint) for r in ci.itertuples(index=False)
                 if r.untrained and r.method != BASE}
    return untrained | {(r.method, r.benchmark, r.checkpoint) for r in tidy.itertuples(index=False)
                        if r.method != BASE and r.model_step == 0}


def _benchmark_metrics(cfg: Config, tidy: pd.DataFrame) -> list[str]:
    """pass@1 (else the smallest k evaluated), the largest k, and greedy accuracy when evaluated."""
    ks = sorted({int(m[5:]) for m in tidy["metric"] if m.startswith("pass@")}) if not tidy.empty else []
    ks = ks or list(cfg.eval.pass_k)
    metrics = ["pass@1" if 1 in ks else f"pass@{ks[0]}"]
    if max(ks) != int(metrics[0][5:]):
        metrics.append(f"pass@{max(ks)}")
    if cfg.eval.greedy:
        metrics.append("greedy_acc")
    return metrics


def _benchmark_bars(ax, cells: _BenchCells, methods, ckpts, bench: str, metric: str, styles) -> None:
    """One panel: a group of bars per method (one per checkpoint; the untrained model one), y up to the highest
    error bar."""
    x = np.arange(len(methods))
    width = 0.8 / max(1, len(ckpts))
    drawn, top = False, 0.0
    for i, method in enumerate(methods):
        bars = [("base", 0, 0.0)] if method == BASE else [
            (ckpt, j, (j - (len(ckpts) - 1) / 2) * width) for j, ckpt in enumerate(ckpts)]
        for ckpt, j, off in bars:
            bar = cells.bar((method, bench, ckpt, metric))
            if bar is None:
                continue
            drawn = True
            est, yerr, high = bar
            top = max(top, high)
            _benchmark_bar(ax, x[i] + off, est, yerr, width, j, styles[method]["color"],
                           step0=(method, bench, ckpt) in cells.untrained)
    if not drawn:
        _no_data(ax)
    ax.set_ylim(0, min(1.0, max(0.05, 1.2 * top)))


def _benchmark_bar(ax, x: float, est: float, yerr, width: float, j: int, color, step0: bool) -> None:
    """Checkpoint j's bar at x, marked 'step 0' when it is the untrained model; a zero drawn as a zero."""
    ax.bar(x, est, width * 0.92, color=color, alpha=CHECKPOINT_ALPHAS[j % len(CHECKPOINT_ALPHAS)],
           hatch=CHECKPOINT_HATCHES[j % len(CHECKPOINT_HATCHES)], edgecolor="white" if j == 0 else color,
           yerr=yerr, error_kw={"elinewidth": 0.7, "capsize": 1.5})
    if step0:  # a "best" that is the step-0 model
        ax.text(x, est + 0.02, "step 0", ha="center", va="bottom", fontsize=4.5, rotation=90, color="0.3")
    if est == 0:  # a zero-height bar is invisible: draw its floor and say 0
        ax.plot([x - width * 0.4, x + width * 0.4], [0, 0], color=color, linewidth=2.0, solid_capstyle="butt",
                clip_on=False, zorder=4)
        ax.text(x, 0.01, "0", ha="center", va="bottom", fontsize=5, color=color)


def _checkpoint_legend(fig, cfg: Config, ckpts, height: float) -> None:
    """One patch per checkpoint above the panels, in the hatch and shade its bars have."""
    handles = [Patch(facecolor="0.35", alpha=CHECKPOINT_ALPHAS[j % len(CHECKPOINT_ALPHAS)],
                     hatch=CHECKPOINT_HATCHES[j % len(CHECKPOINT_HATCHES)], edgecolor="white" if j == 0 else "0.35")
               for j in range(len(ckpts))]
    best_metric = getattr(cfg.checkpoint, "best_metric", "pass@1")
    labels = [f"{ckpt} checkpoint" + (f" (best validation {best_metric})" if ckpt == "best" else
                                      " (last step)" if ckpt == "final" else "") for ckpt in ckpts]
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=len(handles), bbox_to_anchor=(0.5, 1.0))
        fig.get_layout_engine().set(rect=(0, 0, 1, 1 - 0.3 / height))


_FIGURES = {"val_passk": _fig_val_passk, "training": _fig_training, "cliffs": _fig_cliffs,
            "cliff_recovery": _fig_cliff_recovery, "passk_curve": _fig_passk_curve,
            "lambda_sweep": _fig_lambda_sweep, "forest": _fig_forest, "benchmarks": _fig_benchmarks,
            "claims": _fig_claims}


def write_figures(cfg: Config, results_dir: str | Path, out_dir: str | Path,
                  names: tuple[str, ...] = FIGURE_NAMES) -> list[Path]:
    """Write <name>.png and <name>.pdf for each figure under out_dir; return the paths."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods_of(cfg)  # registers the methods' labels
    written: list[Path] = []
    with matplotlib.style.context(str(STYLE_FILE)):
        for name in names:
            fig = _FIGURES[name](cfg, results_dir)
            written += save_figure(fig, out_dir, name)
    return written
