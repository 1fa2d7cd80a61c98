"""Following a run live: experiment trackers fed from the same rows as metrics.jsonl.

`tracking.backends` names them (tensorboard, wandb, mlflow; none by default). Each is optional: asked for and
not installed, it costs one warning and the run goes on. A tracker never stops training: one that fails while
the run goes on is warned about once and dropped.

- Every numeric, finite field of every row is a scalar at the row's step (train rows under their own names,
  validation rows under `val/...`, `probe/...`, `time/eval`); at the end, the run's summary, its validation table
  and a figure of its curves (hdpo.tracking.run_end).
- Resumed runs continue the same tracker runs: each backend's run id and the last step of each row kind it
  holds are kept in <work dir>/trackers.json. A resumed trainer re-validates and re-trains the steps after its
  checkpoint; rows a backend holds are not sent again (the trajectory is the same), and a backend that lacks
  rows of metrics.jsonl (added on resume, or behind) is given them first. MLflow and TensorBoard write each row
  at once, so it counts as held when sent. W&B buffers rows for seconds and a killed process loses them: its
  rows count as held only once its run was closed, and on resume it gets every later row again; the W&B
  server drops the steps it has (`WandbBackend`), and offline the newest offline folder holds every row.
- Only rank 0 logs (the trainer opens trackers there alone).
- A log line per training step when stderr is not a terminal (Snakemake logs, SLURM, `nohup`): a progress
  bar's carriage returns make such logs unreadable, so the trainer turns its bar off there and `step_line`
  says the same in one line.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from hdpo.io import atomic_write_text

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # pip names


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


class Backend(Protocol):
    """One tracker. `state` (its entry of trackers.json) holds what it needs to reopen the same run. `durable`:
    whether a row is stored once `log` returns (else only once `close` returns)."""
    durable: bool

    def log(self, values: dict[str, float], step: int) -> None: ...

    def log_end(self, summary: dict[str, float], tables: dict[str, list[dict]], figures: dict, step: int) -> None:
        ...

    def close(self) -> None: ...


@dataclass
class RunInfo:
    """What names a tracker run: the run's folder name, its method and seed, its resolved config, and the work
    dir (where trackers.json and local tracker files go)."""
    name: str
    method: str
    seed: int
    config: dict
    work_dir: Path


class Trackers:
    """The configured backends, each fed the rows it has not had yet (by row kind and step)."""

    def __init__(self, backends: dict[str, Backend], state: dict, state_path: Path):
        self.backends, self.state, self.state_path = backends, state, state_path

    def log(self, row: dict) -> None:
        kind, step = row.get("kind", "train"), int(row.get("step", 0))
        values, sent = scalars(row), False
        for name, backend in list(self.backends.items()):
            logged = self.state[name].setdefault("logged", {})
            if step <= logged.get(kind, -1):
                continue  # a resumed run's repeat of a row this backend has
            if self._call(name, backend.log, values, step):
                logged[kind], sent = step, True
        if sent:
            self._save()

    def log_end(self, summary: dict, tables: dict[str, list[dict]], figures: dict) -> None:
        flat = {k: float(v) for k, v in flatten(summary, "/").items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for name, backend in list(self.backends.items()):
            step = max(self.state[name].get("logged", {}).values(), default=0)
            self._call(name, backend.log_end, flat, tables, figures, step)

    def close(self) -> None:
        for name, backend in list(self.backends.items()):
            if self._call(name, backend.close):
                self.state[name]["held"] = dict(self.state[name].get("logged", {}))
        self.backends = {}
        self._save()

    def _call(self, name: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as err:  # a tracker's outage (network, quota, a full disk) must not stop a week-long run
            log.warning("tracking: %s failed (%s: %s); the run goes on without it", name, type(err).__name__, err)
            self.backends.pop(name, None)
            return False

    def _save(self) -> None:
        """What each backend holds for sure: what it was sent if it stores rows at once, else what it had when
        it was last closed."""
        held = {name: {**entry, "logged": entry.get("logged", {}) if entry.get("durable", True)
                       else entry.get("held", {})} for name, entry in self.state.items()}
        atomic_write_text(self.state_path, json.dumps(held, indent=1) + "\n")


def open_trackers(names: Iterable[str], info: RunInfo, settings, fresh: bool) -> Trackers:
    """The backends `names`, each reopening its run of trackers.json in the work dir (a new run with `fresh`,
    or where it has none). A backend whose package is missing, or that cannot start, is one warning."""
    state_path = info.work_dir / "trackers.json"
    state = {} if fresh or not state_path.exists() else json.loads(state_path.read_text())
    backends: dict[str, Backend] = {}
    for name in dict.fromkeys(names):  # in order, once each
        entry = state.setdefault(name, {})
        try:
            backends[name] = _backend(name, info, settings, entry)
            entry["durable"] = backends[name].durable
        except ImportError as err:
            log.warning("tracking.backends has %s but %s (pip install %s, or the `tracking` extra): not logging "
                        "to it", name, err, INSTALL[name])
            state.pop(name)
        except Exception as err:
            log.warning("tracking: %s could not start (%s: %s); the run goes on without it", name,
                        type(err).__name__, err)
            state.pop(name)
    trackers = Trackers(backends, state, state_path)
    trackers._save()
    return trackers


def _backend(name: str, info: RunInfo, settings, state: dict) -> Backend:
    if name == "tensorboard":
        from hdpo.tracking.tensorboard import TensorBoardBackend
        return TensorBoardBackend(info, state)
    if name == "wandb":
        from hdpo.tracking.wandb import WandbBackend
        return WandbBackend(info, settings, state)
    if name == "mlflow":
        from hdpo.tracking.mlflow import MlflowBackend
        return MlflowBackend(info, settings, state)
    raise ValueError(f"unknown tracking backend {name!r} (known: {', '.join(BACKENDS)})")


def flatten(data: dict, sep: str, prefix: str = "") -> dict:
    """{'best': {'pass@1': {'value': .4}}} -> {'best/pass@1/value': .4} (sep '/')"""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, sep, key + sep))
        else:
            out[key] = v
    return out
