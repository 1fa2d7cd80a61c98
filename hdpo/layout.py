"""Where the workflow's files live, relative to its working directory: run names and result paths.

Each name and path is written here once. The Snakemake rules build their output patterns from these functions
with wildcards (`run_dir(RUN)` is 'results/runs/{method}_seed{seed}'), and the targets with values.
"""
from __future__ import annotations

from hdpo.io import samples_path

DATA_DIR = "results/data"
CONFIG_DIR = "results/config"  # the merged configs the jobs read, named by their content
CHECKPOINTS_DIR = "results/checkpoints"  # resumable checkpoints, when checkpoint.dir is not set


def run_name(method: str, seed: int | str) -> str:
    """One training run: a method of the grid and a seed."""
    return f"{method}_seed{seed}"


RUN = run_name("{method}", "{seed}")  # the run name as Snakemake wildcards


def run_dir(run: str) -> str:
    return f"results/runs/{run}"


# The aggregated files of a run: what the report reads (never the checkpoints).
RUN_FILES = ("metrics.jsonl", "summary.json", "cliffs.jsonl", "val_problems.jsonl.gz")


def run_files(run: str) -> list[str]:
    return [f"{run_dir(run)}/{name}" for name in RUN_FILES]


def policy_dir(run: str, checkpoint: str) -> str:
    """A kept policy of a run: 'final' or 'best'."""
    return f"{run_dir(run)}/policy_{checkpoint}"


def eval_result(run: str, checkpoint: str, bench: str) -> str:
    """One checkpoint of a run on one benchmark; its per-problem samples are `eval_samples` of it."""
    return f"results/eval/{run}/{checkpoint}/{bench}.json"


def base_eval_result(bench: str) -> str:
    """The untrained model on one benchmark."""
    return f"results/eval/base/{bench}.json"


def eval_samples(result: str) -> str:
    return str(samples_path(result))


def work_dir(root: str, run: str, settings_digest: str) -> str:
    """A run's resumable checkpoints, one folder per training settings."""
    return f"{root}/{run}/{settings_digest}"


TABLE_NAMES = ("table1", "validation", "differences", "benchmarks")  # each as .csv (the truth), .md, .tex
TABLES = [f"results/tables/{n}.{ext}" for n in TABLE_NAMES for ext in ("csv", "md", "tex")] + [
    "results/tables/benchmarks_intervals.csv", "results/tables/cliffs.csv", "results/tables/cliffs.md",
    "results/tables/claims.csv", "results/tables/claims.md"]
FIGURE_NAMES = ("val_passk", "training", "cliffs", "cliff_recovery", "passk_curve", "lambda_sweep", "forest",
                "benchmarks", "claims")  # hdpo.report.figures draws these
FIGURES = [f"figures/{n}.{ext}" for n in FIGURE_NAMES for ext in ("png", "pdf")]
