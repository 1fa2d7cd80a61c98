"""The replication's report, by job: `frames` (aggregation of result files into frames and per-problem score
matrices), `tables` (CSV truth, Markdown and LaTeX), `figures` (PNG and PDF), `names` (labels and colours);
the statistics are in hdpo.stats. `hdpo report tables|figures` imports only `tables` or `figures` (and what
they import), so each Snakemake report rule depends on the code it uses and nothing else.

The names below are re-exported lazily for convenience (importing this package loads no submodule).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "frames": ("OURS", "SELECTIONS", "Cell", "benchmarks_frame", "interval_frame", "difference_frame", "summarize",
               "table1_frame", "train_frame", "val_frame", "bench_interval_frame", "ledger_frame"),
    "names": ("MISSING", "method_label", "methods_of", "run_name", "val_metrics"),
    "tables": ("TABLE_NAMES", "table1_cells", "write_tables"),
    "figures": ("FIGURE_NAMES", "write_figures"),
}


def __getattr__(name: str):
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"hdpo.report.{module}"), name)
    raise AttributeError(f"module 'hdpo.report' has no attribute {name!r}")
