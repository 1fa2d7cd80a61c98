"""What a tracker gets at the end of a run besides its summary: the validation table (one row per validation
step) and one figure of the run's curves (training reward and cliff fraction per step, validation pass@k)."""
from __future__ import annotations

from matplotlib.figure import Figure


def validation_table(rows: list[dict]) -> list[dict]:
    """One row per validation: its step and its val/... and probe/... numbers (the same columns in every row)."""
    val = [r for r in rows if r.get("kind") == "val"]
    cols = sorted({k for r in val for k in r if k.startswith(("val/", "probe/"))})
    return [{"step": r["step"], **{c: r.get(c) for c in cols}} for r in val]


def curves(rows: list[dict], title: str) -> Figure:
    """Built without pyplot: a training process needs no GUI backend, and nothing is left open."""
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    steps = [r["step"] for r in train]
    left.plot(steps, [r.get("reward/mean") for r in train], label="reward (mean)")
    left.plot(steps, [r.get("cliff_fraction") for r in train], label="cliff fraction")
    left.set(xlabel="step", title="training")
    left.legend(fontsize="small")
    for key in sorted({k for r in val for k in r if k.startswith("val/pass@") or k == "val/greedy_acc"}):
        right.plot([r["step"] for r in val], [r.get(key) for r in val], marker="o", label=key[4:])
    right.set(xlabel="step", title="validation")
    if val:
        right.legend(fontsize="small")
    fig.suptitle(title)
    return fig
