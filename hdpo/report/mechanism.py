"""The mechanism experiment's report: results/mechanism/outcomes.{csv,md}, per_problem.csv and
figures/mechanism.{png,pdf}, from the runs' ledgers and metrics and the measurement files (hdpo.mechanism)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.style
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hdpo.config import Config
from hdpo.io import atomic_path, atomic_write_text, read_jsonl
from hdpo.mechanism import OUTCOMES, outcomes, per_problem
from hdpo.report.figures import STYLE_FILE, save_figure
from hdpo.stats import format_p

COLORS = {"grpo": "#7F7F7F", "hdpo": "#D55E00", "base": "#BBBBBB"}


def methods_of(cfg: Config) -> tuple[str, str]:
    """(the control: distill_weight 0, the HDPO method) of the mechanism config's two methods."""
    ms = cfg.experiment.methods
    grpo = [n for n, m in ms.items() if m.distill_weight == 0.0]
    hdpo = [n for n, m in ms.items() if m.distill_weight > 0.0]
    if len(grpo) != 1 or len(hdpo) != 1:
        raise ValueError("experiment.methods: the mechanism experiment needs one method with distill_weight 0 "
                         f"(GRPO) and one with distill_weight > 0 (HDPO), got {sorted(ms)}")
    return grpo[0], hdpo[0]


def load(cfg: Config, root: Path) -> tuple[list[dict], list[dict], pd.DataFrame]:
    """(outcome rows, per-problem rows, the HDPO and GRPO runs' metrics) from root = results/mechanism."""
    grpo, hdpo = methods_of(cfg)
    seeds = list(cfg.experiment.seeds)
    ids = [r["id"] for r in read_jsonl(root / "data" / "train.jsonl")]
    ledgers, metrics = {}, []
    for method in (grpo, hdpo):
        for seed in seeds:
            run = root / "runs" / f"{method}_seed{seed}"
            ledgers[(method, seed)] = list(read_jsonl(run / "cliffs.jsonl"))
            metrics += [{**r, "method": method, "seed": seed} for r in read_jsonl(run / "metrics.jsonl")
                        if r.get("kind") == "train"]
    measures = {p.stem: {r["id"]: r for r in read_jsonl(p)} for p in (root / "measure").glob("*.jsonl")}
    rows = per_problem(ids, ledgers, measures, [grpo, hdpo], seeds, hdpo)
    return outcomes(rows, grpo, hdpo, seeds), rows, pd.DataFrame(metrics)


def task_difficulty(root: Path) -> dict:
    """The untrained model's plain and privileged pass rates over the pool (measured before any training: the
    numbers that say whether the task has cliffs that privileged information can open)."""
    base = list(read_jsonl(root / "measure" / "base.jsonl"))
    ref = list(read_jsonl(root / "reference.jsonl"))
    return {"plain_correct": sum(r["solved"] for r in base), "plain_samples": sum(r["samples"] for r in base),
            "privileged_correct": sum(r["correct"] for r in ref), "privileged_samples": sum(r["drawn"] for r in ref),
            "problems": len(base)}


def _cell(row: dict, name: str, digits: int = 3) -> str:
    if name not in row:
        return "–"
    sign = "+" if name == "diff" else ""
    return (f"{row[name]:{sign}.{digits}f} [{row[f'{name}_low']:{sign}.{digits}f}, "
            f"{row[f'{name}_high']:{sign}.{digits}f}]")


def difficulty_line(d: dict) -> str:
    return (f"Untrained model on the {d['problems']} training problems: plain-prompt pass rate "
            f"{d['plain_correct'] / d['plain_samples']:.3f} ({d['plain_correct']} of {d['plain_samples']} samples), "
            f"privileged-prompt pass rate {d['privileged_correct'] / d['privileged_samples']:.3f} "
            f"({d['privileged_correct']} of {d['privileged_samples']}).")


def markdown(rows: list[dict], cfg: Config, difficulty: dict) -> str:
    grpo, hdpo = methods_of(cfg)
    labels = {m: cfg.experiment.methods[m].label or m for m in (grpo, hdpo)}
    lines = [f"| outcome | measure | problems × seeds | untrained | {labels[grpo]} | {labels[hdpo]} | "
             "HDPO − GRPO | p |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["problems"]:
            lines.append(f"| {r['outcome']} | {r['measure']} ({r['set']}) | 0 | – | – | – | no such problems "
                         "| – |")
            continue
        lines.append(f"| {r['outcome']} | {r['measure']} ({r['set']}) | {r['problems']} × {r['seeds']} | "
                     f"{_cell(r, 'base')} | {_cell(r, 'grpo')} | {_cell(r, 'hdpo')} | {_cell(r, 'diff')} | "
                     f"{format_p(r['p'])} |")
    return (difficulty_line(difficulty) + "\n\nMean [95% interval], seeds and problems random (hdpo.stats' "
            "crossed model); HDPO − GRPO paired by problem and seed. distilled_cliff: problems HDPO distilled at "
            "least once in every seed; never_cliff: never a cliff in any run.\n\n" + "\n".join(lines) + "\n")


def figure(rows: list[dict], problems: list[dict], metrics: pd.DataFrame, cfg: Config) -> Figure:
    grpo, hdpo = methods_of(cfg)
    fig = Figure(figsize=(7.0, 2.5), layout="constrained")
    axes = fig.subplots(1, 5, width_ratios=[1, 1, 1, 1, 1.3])
    frame = pd.DataFrame(problems)
    by = {r["outcome"]: r for r in rows}
    panels = [("a_logprob", "(a) Δ log-lik./token\nprivileged responses", axes[0]),
              ("a_jsd", "(a) Δ JSD to teacher\non those responses", axes[1]),
              ("b_solve", "(b) solve rate\ndistilled cliffs", axes[2]),
              ("c_solve", "(c) solve rate\nnever a cliff", axes[3])]
    for key, title, ax in panels:
        r = by[key]
        ax.tick_params(labelsize=6)
        value = next(v for k, _, _, v, _ in OUTCOMES if k == key)
        ax.set_title(title, fontsize=7)
        if not r["problems"]:
            ax.text(0.5, 0.5, "no such problems", transform=ax.transAxes, ha="center", va="center", color="0.5")
            continue
        names = (["base"] if "base" in r else []) + ["grpo", "hdpo"]
        for x, name in enumerate(names):
            if name != "base":  # each (problem, seed) as a faint point, jittered
                sub = frame[(frame.method == (grpo if name == "grpo" else hdpo)) & (frame.set == r["set"])]
                if key.startswith("a_"):
                    sub = sub[sub.references > 0]
                ys = sub.apply(value, axis=1).to_numpy(float)
                jitter = np.random.default_rng(x).uniform(-0.12, 0.12, len(ys))
                ax.scatter(x + jitter, ys, s=4, color=COLORS[name], alpha=0.35, linewidths=0)
            ax.errorbar(x, r[name], yerr=[[r[name] - r[f"{name}_low"]], [r[f"{name}_high"] - r[name]]],
                        fmt="o", color=COLORS[name], ms=4, capsize=2, zorder=3)
        ax.set_xticks(range(len(names)), [{"base": "start", "grpo": "GRPO", "hdpo": "HDPO"}[n] for n in names])
        if key.startswith("a_"):
            ax.axhline(0, color="0.6", lw=0.6)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_xlabel(f"H−G {r['diff']:+.2g} [{r['diff_low']:+.2g}, {r['diff_high']:+.2g}]", fontsize=6)
    ax = axes[4]  # what the trainer saw: the plain reward and the JSD it minimised, per step, mean over seeds
    ax.set_title("training (mean of seeds)\nreward —, JSD loss - -", fontsize=7)
    if not metrics.empty:
        for name, method in (("grpo", grpo), ("hdpo", hdpo)):
            per_step = metrics[metrics.method == method].groupby("step")[["reward/mean", "loss/jsd"]].mean()
            ax.plot(per_step.index, per_step["reward/mean"], color=COLORS[name], label=name.upper())
            if name == "hdpo":
                ax.plot(per_step.index, per_step["loss/jsd"], color=COLORS[name], ls="--")
        ax.set_xlabel("step", fontsize=6)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, frameon=False)
    return fig


def write(cfg: Config, root: str | Path, figures_dir: str | Path) -> list[Path]:
    root, figures_dir = Path(root), Path(figures_dir)
    rows, problems, metrics = load(cfg, root)
    out = [root / "outcomes.csv", root / "outcomes.md", root / "per_problem.csv"]
    with atomic_path(out[0]) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    difficulty = task_difficulty(root)
    atomic_write_text(out[1], markdown(rows, cfg, difficulty))
    with atomic_path(out[2]) as tmp:
        pd.DataFrame(problems).to_csv(tmp, index=False)
    figures_dir.mkdir(parents=True, exist_ok=True)
    with matplotlib.style.context(str(STYLE_FILE)):  # the report's style, without changing the process's
        fig = figure(rows, problems, metrics, cfg)
        fig.suptitle(difficulty_line(difficulty), fontsize=6)
        return out + save_figure(fig, figures_dir, "mechanism")
