"""Names, labels and colours of methods, metrics and benchmarks, shared by tables and figures.

`methods_of(cfg)` is the one place the report learns what a method is (its label, teacher and lambda); the
rest of the report reads methods only through it and the helpers below.
"""
from __future__ import annotations

import textwrap
from typing import Optional

from hdpo.config import Config, method_records

MISSING = "–"
BASE = "base"  # the untrained model (step 0), a row of its own in the tables
BENCHMARK_LABELS = {"math500": "MATH-500", "aime24": "AIME 2024", "aime25": "AIME 2025"}


_KNOWN: dict[str, dict] = {}  # filled by methods_of: what method_label / method_short find by name


def methods_of(cfg: Config) -> dict[str, dict]:
    """The config's methods in grid order: name -> {label, short, teacher (None for GRPO), distill_weight},
    from the records under experiment.methods. It also registers the labels, so `method_label(name)` gives a
    record's own label; write_tables and write_figures call it first."""
    out = {}
    for name, rec in method_records(cfg).items():
        hdpo = rec.distill_weight > 0
        out[name] = {"label": rec.label, "short": _short(rec, hdpo),
                     "teacher": rec.teacher if hdpo else None, "distill_weight": float(rec.distill_weight)}
    _KNOWN.update(out)
    return out


def _short(rec, hdpo: bool) -> str:
    """A tick label a few characters wide: 'frozen\nλ=0.1'; a method with settings of its own, its label
    wrapped (its 'HDPO' prefix dropped), so a long label does not run into its neighbours'."""
    if not rec.settings:
        return f"{rec.teacher}\nλ={rec.distill_weight:g}" if hdpo else "GRPO"
    text = rec.label.removeprefix("HDPO ") if hdpo else rec.label
    return "\n".join(line.rstrip(",") for line in textwrap.wrap(text, 12, break_long_words=False)) or rec.name


def baseline_of(cfg: Config) -> Optional[str]:
    """The method the paired differences are taken against: the GRPO run (lambda 0, no teacher)."""
    for name, spec in methods_of(cfg).items():
        if spec["teacher"] is None and spec["distill_weight"] == 0.0:
            return name
    return None


def run_name(method: str, seed: int | str) -> str:
    return f"{method}_seed{seed}"


def val_metrics(cfg: Config) -> list[str]:
    """The validation metrics in table order: pass@k for the config's k, then greedy accuracy."""
    names = [f"pass@{k}" for k in cfg.eval.pass_k]
    return names + (["greedy_acc"] if cfg.eval.greedy else [])


def method_label(method: str, fmt: str = "text") -> str:
    """A method's label from its record (fmt 'text' or 'md'), with $\\lambda$ for 'tex'."""
    if method == BASE:
        return "base model (step 0)"
    spec = _KNOWN.get(method)
    label = spec["label"] if spec else method
    return tex_escape(label) if fmt == "tex" else label


def method_short(method: str) -> str:
    """A two-line tick label: 'frozen\\nλ=0.1'."""
    if method == BASE:
        return "base"
    spec = _KNOWN.get(method)
    return spec["short"] if spec else method


def metric_label(metric: str) -> str:
    return "greedy acc." if metric == "greedy_acc" else metric


def benchmark_label(bench: str) -> str:
    return BENCHMARK_LABELS.get(bench, bench)


def tex_escape(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("#", "\\#"), ("_", "\\_"),
                 ("{", "\\{"), ("}", "\\}"), ("×", "$\\times$"), ("λ", "$\\lambda$"), ("–", "--"),
                 ("−", "$-$"), ("±", "$\\pm$")):
        text = text.replace(a, b)
    return text


_NEUTRAL = "#000000"
_TEACHER_SHADES = {"frozen": ["#56B4E9", "#0072B2", "#003F63"], "drifting": ["#E69F00", "#D55E00", "#8C3A00"]}
_EXTRA = ["#009E73", "#CC79A7", "#F0E442", "#999999"]


def method_styles(cfg: Config) -> dict[str, dict]:
    """One colour and line style per method, stable across figures: GRPO black; frozen teacher in blues,
    drifting in oranges (darker = larger lambda); frozen dashed, drifting solid."""
    styles: dict[str, dict] = {}
    by_teacher: dict[str, list[tuple[float, str]]] = {}
    extra = iter(_EXTRA * 10)
    for m, spec in methods_of(cfg).items():
        if spec["teacher"] is None and spec["distill_weight"] == 0.0:
            styles[m] = {"color": _NEUTRAL, "linestyle": "-"}
        elif spec["teacher"] in _TEACHER_SHADES:
            by_teacher.setdefault(spec["teacher"], []).append((spec["distill_weight"], m))
        else:
            styles[m] = {"color": next(extra), "linestyle": "-"}
    for teacher, items in by_teacher.items():
        shades = _TEACHER_SHADES[teacher]
        for i, (_, m) in enumerate(sorted(items)):
            color = shades[min(i, len(shades) - 1)] if len(items) <= len(shades) else next(extra)
            styles[m] = {"color": color, "linestyle": "--" if teacher == "frozen" else "-"}
    styles[BASE] = {"color": "0.6", "linestyle": ":"}
    return styles
