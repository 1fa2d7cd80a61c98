"""The cluster path, run for real: the tiny DAG through workflow/profiles/slurm on a SLURM (a single node brought
up by scripts/slurm_local.sh), every rule a SLURM job, while the scheduler ends two training jobs: one cancelled
(`scancel`) after its first checkpoint, one stuck job killed at its time limit. The profile retries both, both
resume from their checkpoints, and the runs' metrics and every table equal those of the same DAG run locally.

Skipped where no SLURM answers (`sinfo`), except under HDPO_REQUIRE_SLURM=1 (.ci/run brings one up), where that
is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.test_workflow import REPO, SNAKEMAKE, _tiny, snakemake, write_config

PROFILE = REPO / "workflow" / "profiles" / "slurm"


def _slurm_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


if os.environ.get("HDPO_REQUIRE_SLURM") == "1":
    assert _slurm_answers(), "HDPO_REQUIRE_SLURM=1 but `sinfo` gets no answer (bash scripts/slurm_local.sh up)"
else:
    pytestmark = pytest.mark.skipif(not _slurm_answers(), reason="no SLURM here (bash scripts/slurm_local.sh up)")


def _config() -> dict:
    cfg = _tiny()
    cfg["grpo"]["max_num_steps"] = 3  # a checkpoint per step: the killed jobs resume mid-run
    # the same threads locally and under SLURM (float sums depend on them); small enough for one 2-CPU node
    cfg["resources"] = {rule: {"gpu": 0, "threads": 1, "mem_mb": 2000, "runtime": 10}
                        for rule in ("prepare_data", "train", "evaluate", "report")}
    return cfg


def _repo(root: Path) -> Path:
    shutil.copytree(REPO / "workflow", root / "workflow")
    shutil.copytree(REPO / "hdpo", root / "hdpo", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _train_jobs(root: Path) -> dict[str, str]:
    """SLURM job id -> the run it trains, for the train jobs running now (from each job's own log, which the
    plugin names by job id under .snakemake/slurm_logs/rule_train/)."""
    out = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True).stdout
    running = set(out.split())
    jobs = {}
    for log in (root / ".snakemake" / "slurm_logs" / "rule_train").rglob("*.log"):
        m = re.search(r"wildcards: method=(\S+), seed=(\d+)", log.read_text())
        if log.stem in running and m:
            jobs[log.stem] = f"{m.group(1)}_seed{m.group(2)}"
    return jobs


class Scheduler(threading.Thread):
    """What a busy cluster does to two training jobs: the stuck one (it hangs after its first checkpoint: the
    fault's once-file holds its job id) gets a time limit it has already used up; the other is cancelled as
    soon as its log shows its first checkpoint."""

    def __init__(self, root: Path, once: Path):
        super().__init__(daemon=True)
        self.root, self.once, self.stop = root, once, threading.Event()
        self.timed_out, self.cancelled, self.errors = None, None, []

    def run(self) -> None:
        try:
            while not self.stop.is_set() and (self.timed_out is None or self.cancelled is None):
                if self.timed_out is None and self.once.exists() and self.once.read_text().strip():
                    self.timed_out = self.once.read_text().strip()
                    subprocess.run(["scontrol", "update", f"JobId={self.timed_out}", "TimeLimit=1"], check=True)
                if self.cancelled is None:
                    for job, run in _train_jobs(self.root).items():
                        log = self.root / "results" / "logs" / "train" / f"{run}.log"
                        if job != self.timed_out and log.exists() and "checkpoint at step 1" in log.read_text():
                            subprocess.run(["scancel", job], check=True)
                            self.cancelled = job
                            break
                time.sleep(0.2)
        except Exception as err:  # noqa: BLE001 (reported by the test)
            self.errors.append(repr(err))


def _metrics(root: Path, run: str) -> list[dict]:
    """A run's metrics rows without the wall-clock fields."""
    rows = [json.loads(line) for line in (root / "results" / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not re.search(r"(^|/)(time|wall|tokens_per_s|mem)", k)} for r in rows]


def _tables(root: Path) -> dict[str, str]:
    """Every table file, timing columns left out (none are expected in the tables the tiny DAG writes)."""
    return {p.name: p.read_text() for p in sorted((root / "results" / "tables").iterdir())}


def test_the_dag_through_slurm_survives_a_cancel_and_a_time_limit(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    monkeypatch.setenv("HDPO_TINY_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HDPO_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cfg = _config()

    root = _repo(tmp_path / "cluster")
    once = tmp_path / "hang-once"
    env = dict(os.environ, HDPO_SLURM_ACCOUNT=os.environ.get("HDPO_SLURM_ACCOUNT", "root"),
               HDPO_SLURM_PARTITION=os.environ.get("HDPO_SLURM_PARTITION", "cpu"),
               HDPO_FAULT="hang@checkpoint:1", HDPO_FAULT_ONCE=str(once))
    cmd = [*SNAKEMAKE, "-s", str(root / "workflow" / "Snakefile"), "--directory", str(root),
           "--profile", str(root / "workflow" / "profiles" / "slurm"),
           "--configfile", str(write_config(root / "c.yaml", cfg)),
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "2",
           "--latency-wait", "5"]
    watcher = Scheduler(root, once)
    watcher.start()
    started = time.monotonic()
    cluster = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        # the reference: the same DAG on this machine, meanwhile (the cluster's stuck job idles until its limit)
        local = _repo(tmp_path / "local")
        snakemake(local, "--cores", "2", "--configfile", str(write_config(local / "c.yaml", cfg)),
                  snakefile=local / "workflow" / "Snakefile")
        out, _ = cluster.communicate(timeout=540)
    finally:
        cluster.kill()
        watcher.stop.set()
    assert cluster.returncode == 0, out[-6000:]
    assert not watcher.errors, watcher.errors
    assert watcher.timed_out and watcher.cancelled, (watcher.timed_out, watcher.cancelled, out[-3000:])
    print(f"SLURM DAG: {time.monotonic() - started:.0f} s")

    # every rule ran as a SLURM job (the report rules are local rules by design), and both killed jobs were
    # retried: the scheduler's states as Snakemake saw them
    submitted = set(re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", out))
    assert len(submitted) >= 1 + 1 + 2 + 4 + 1 + 2, out[-3000:]  # data, benchmark, 2 trains, evals, base, retries
    assert re.search(rf"SLURM.*{watcher.cancelled}.*CANCELLED|{watcher.cancelled}.*CANCELLED", out), out[-3000:]
    assert re.search(rf"{watcher.timed_out}.*TIMEOUT", out), out[-3000:]
    assert "Trying to restart job" in out, out[-3000:]
    for run in ("grpo_seed1", "hdpo_frozen_lambda0.1_seed1"):
        log = (root / "results" / "logs" / "train" / f"{run}.log").read_text()
        assert re.search(r"resumed from .* at step [1-9]", log), log[-2000:]
        assert _metrics(root, run) == _metrics(local, run), run
    # each SLURM job's own log, where docs/slurm.md says to look
    logs = list((root / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {p.stem for p in logs} >= {watcher.timed_out, watcher.cancelled}, logs
    assert _tables(root) == _tables(local)
