"""Progress of a long evaluation: a bar on a terminal, and off one (Snakemake logs, SLURM) a log line every N
problems with the problems done, samples per second and the time left. A paper-scale validation is 2048
problems x 8 samples: without it a job log is silent for many minutes."""
from __future__ import annotations

import logging
import math
import time

from tqdm import tqdm

from hdpo.tracking import is_terminal

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h} h {rest // 60} min" if h else f"{rest // 60} min {rest % 60} s" if rest >= 60 else f"{rest} s"


class EvalProgress:
    """Counts problems as their samples are done (`done(i, samples)`, the shape of Generator.generate_then's
    callback). `enabled` False (ranks > 0): silent. `every`: problems between log lines (default: 10%)."""

    def __init__(self, what: str, problems: int, samples_per_problem: int, enabled: bool = True,
                 every: int | None = None, terminal: bool | None = None):
        self.what, self.total, self.per = what, problems, samples_per_problem
        self.enabled = enabled and problems > 0
        self.terminal = is_terminal() if terminal is None else terminal
        self.every = every or max(1, math.ceil(problems / 10))
        self.count, self.t0 = 0, time.time()
        self.bar = tqdm(total=problems, desc=what, unit="problem", dynamic_ncols=True, leave=False,
                        disable=not (self.enabled and self.terminal))

    def done(self, i: int, samples) -> None:
        self.count += 1
        self.bar.update(1)
        if self.enabled and not self.terminal and (self.count % self.every == 0 or self.count == self.total):
            log.info("%s", self.line())
        return None  # no follow-up prompt (generate_then's callback contract)

    def line(self) -> str:
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = self.count * self.per / elapsed
        left = (self.total - self.count) * self.per / rate if rate else float("nan")
        return (f"{self.what}: {self.count}/{self.total} problems, {rate:.1f} samples/s, "
                f"{_duration(left) if math.isfinite(left) else '?'} left")

    def close(self) -> None:
        self.bar.close()
