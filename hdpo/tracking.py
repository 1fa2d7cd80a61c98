"""Following a run live, fed from the same rows as metrics.jsonl.

- TensorBoard (optional, `checkpoint.tensorboard: true`): every numeric field of every row becomes a scalar at
  the row's step (train rows under their own names, validation rows under `val/...`). `tensorboard` is an
  optional dependency (`pip install tensorboard`, or the `dev` extra); asked for and missing, the run goes on
  with one warning.
- A log line per training step when stderr is not a terminal (Snakemake logs, SLURM, `nohup`): a progress
  bar's carriage returns make such logs unreadable, so the trainer turns its bar off there and `step_line`
  says the same in one line.
"""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def is_terminal(stream=None) -> bool:
    stream = stream if stream is not None else sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def scalars(row: dict) -> dict[str, float]:
    """The numeric, finite fields of a metrics row except its bookkeeping (kind, step)."""
    out = {}
    for key, value in row.items():
        if key in ("kind", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def step_line(row: dict, total: int) -> str:
    """'step 12/2000 reward 0.41 cliffs 5 kept 23 jsd 0.0123 grpo -0.0004 12.3 s/step' from a train row."""
    def num(key, fmt):
        v = row.get(key)
        return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"
    return (f"step {row['step']}/{total} reward {num('reward/mean', '.3f')} cliffs {num('cliffs', 'd')} "
            f"kept {num('privileged/kept', 'd')} jsd {num('loss/jsd', '.4f')} grpo {num('loss/grpo', '.4f')} "
            f"{num('time/step', '.1f')} s/step")


class TensorBoardLogger:
    """Scalars of metrics rows into TensorBoard event files (None writer when tensorboard is missing)."""

    def __init__(self, log_dir: str | Path):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch ships the writer; it needs the tensorboard package
            log.warning("checkpoint.tensorboard is on but the `tensorboard` package is not installed "
                        "(pip install tensorboard); logging to metrics.jsonl only")
            return
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, int(row.get("step", 0)))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_tensorboard(enabled: bool, log_dir: str | Path) -> Optional[TensorBoardLogger]:
    return TensorBoardLogger(log_dir) if enabled else None
