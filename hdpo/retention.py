"""What the resumable checkpoints hold on disk, and what the retention policy lets go.

A run's work folder is `<checkpoints>/<run>/<settings digest>/`; each change of a run's settings starts a new one,
and a finished run keeps its resumable state (weights + optimizer, ~12 bytes per parameter) in the folder its
policies were published from (recorded as `work_dir` in the run's summary.json). Two config keys decide what
may go: `checkpoint.keep_finished_state` (applied by the trainer itself when a run finishes) and
`checkpoint.keep_superseded` (the folders of earlier settings). `hdpo clean` shows every folder with its size and
fate, and `--apply` frees what the policy lets go. A folder is never touched while a trainer holds its lock, and
one newer than the run's published outputs counts as pending (a stopped trajectory that a rerun resumes).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hdpo.checkpoint import folder_bytes

# The heavy part of a finished work folder: the resumable checkpoint and the best policy's source (copied into
# the run folder). Metrics, ledger and logs stay: they are small and tell what the trajectory was.
FINISHED_STATE = ("checkpoint.pt", "checkpoint.pt.sha256", "policy_best")


def finished_state_bytes(work_dir: Path) -> int:
    return sum(folder_bytes(work_dir / name) for name in FINISHED_STATE if (work_dir / name).exists())


def free_finished_state(work_dir: Path) -> int:
    """Delete a finished run's resumable state; the bytes freed. A rerun of that run then starts from step 0."""
    freed = finished_state_bytes(work_dir)
    for name in FINISHED_STATE:
        path = work_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return freed


def _locked(folder: Path) -> bool:
    """Whether a live trainer holds the folder's lock (hdpo.checkpoint.RunLock)."""
    lock = folder / ".lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _newest(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=folder.stat().st_mtime)


@dataclass
class Folder:
    path: Path
    run: str
    status: str  # published | superseded | pending | in use
    bytes: int  # what freeing would free (the whole folder, or a published one's finished state)
    free: bool  # the policy lets it go


def survey(checkpoints: Path, runs: Path, keep_finished_state: bool, keep_superseded: bool) -> list[Folder]:
    """Every work folder under `checkpoints` (`<run>/<digest>/`), classified against the published runs in
    `runs` (`<run>/summary.json`)."""
    out = []
    if not checkpoints.is_dir():
        return out
    for run_folder in sorted(p for p in checkpoints.iterdir() if p.is_dir()):
        summary_path = runs / run_folder.name / "summary.json"
        published: Optional[Path] = None
        published_at = None
        if summary_path.exists():
            recorded = json.loads(summary_path.read_text()).get("work_dir")
            published = Path(recorded).resolve() if recorded else None
            published_at = summary_path.stat().st_mtime
        for folder in sorted(p for p in run_folder.iterdir() if p.is_dir()):
            if _locked(folder):
                out.append(Folder(folder, run_folder.name, "in use", folder_bytes(folder), False))
            elif published is not None and folder.resolve() == published:
                state = finished_state_bytes(folder)
                out.append(Folder(folder, run_folder.name, "published", state, not keep_finished_state and state > 0))
            elif published_at is not None and _newest(folder) < published_at:
                out.append(Folder(folder, run_folder.name, "superseded", folder_bytes(folder), not keep_superseded))
            else:  # no published run yet, or newer than it: a trajectory a rerun would continue
                out.append(Folder(folder, run_folder.name, "pending", folder_bytes(folder), False))
    return out


def apply(folders: list[Folder]) -> int:
    """Free what the survey marked; the bytes freed."""
    freed = 0
    for f in folders:
        if not f.free or _locked(f.path):
            continue
        if f.status == "published":
            freed += free_finished_state(f.path)
        else:
            freed += folder_bytes(f.path)
            shutil.rmtree(f.path)
    return freed


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(folders: list[Folder]) -> str:
    """A Markdown table a person reads: folder, status, size, fate."""
    lines = ["| work folder | status | size | policy |", "| --- | --- | --- | --- |"]
    for f in folders:
        what = {"published": "finished state" if f.bytes else "finished state already freed"}.get(f.status, "")
        fate = "free" if f.free else "keep"
        lines.append(f"| {f.path} | {f.status}{(' (' + what + ')') if what else ''} | {human(f.bytes)} | {fate} |")
    total = sum(f.bytes for f in folders if f.free)
    lines.append(f"\n{sum(f.free for f in folders)} of {len(folders)} folders to free, {human(total)}")
    return "\n".join(lines)
