"""File I/O at the edges: every file appears atomically (write to a temp file, then rename)."""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from hdpo import faults

log = logging.getLogger(__name__)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; results are meant to be read by others
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; it replaces `path` (old content and all) only if the block
    finishes, so a reader never sees a half-written folder.

    Protocol (each step a rename, so a kill anywhere leaves a state `recover_dir` can finish or undo):
    write `.name.tmp` -> rename it to `.name.ready` (complete) -> `name` to `.name.old` -> `.name.ready` to
    `name` -> delete `.name.old`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp, ready, old = _dir_siblings(path)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, ready)
    _publish_ready(path)


def _dir_siblings(path: Path) -> tuple[Path, Path, Path]:
    return tuple(path.with_name(f".{path.name}.{s}") for s in ("tmp", "ready", "old"))  # type: ignore


def _publish_ready(path: Path) -> None:
    _, ready, old = _dir_siblings(path)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)  # a previous cleanup that was cut short
        os.replace(path, old)
    os.replace(ready, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path) -> Optional[str]:
    """Bring `path` back to a complete state after an `atomic_dir` swap that a kill interrupted: a half-written
    `.tmp` is deleted, a complete `.ready` is published, an `.old` left alone (the previous version) is put back
    when `path` is missing, else deleted. Returns what it did, or None when there was nothing to do."""
    path = Path(path)
    tmp, ready, old = _dir_siblings(path)
    done = []
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"deleted the unfinished {tmp.name}")
    if ready.exists():
        _publish_ready(path)
        done.append(f"published the finished {ready.name}")
    elif old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"deleted the stale {old.name}")
        else:
            os.replace(old, path)
            done.append(f"restored {path.name} from {old.name}")
    if done:
        log.warning("%s: recovered an interrupted write: %s", path, "; ".join(done))
    return "; ".join(done) or None


def clean_stale(folder: str | Path) -> list[str]:
    """Recover every interrupted atomic write in `folder` (not recursive): stale `.name.*.tmp` files and
    folders are deleted, interrupted folder swaps finished or undone. Only safe while no other process writes
    there (the trainer holds its run lock). Returns the names it acted on."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    acted = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith(".") or not os.path.lexists(entry):  # gone: recovered with a sibling
            continue
        base, _, suffix = name[1:].rpartition(".")
        if suffix in ("ready", "old") or (suffix == "tmp" and entry.is_dir()):  # an atomic_dir sibling
            if recover_dir(folder / base):
                acted.append(name)
        elif suffix == "tmp":  # an atomic_path temp file: `.name.XXXXXXXX.tmp`
            entry.unlink()
            log.warning("%s: deleted a stale temp file left by an interrupted write", entry)
            acted.append(name)
    return acted


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def samples_path(result_json: str | Path) -> Path:
    """The per-problem records written beside an evaluation's summary JSON (`<bench>.samples.jsonl.gz`)."""
    result_json = Path(result_json)
    return result_json.with_name(result_json.stem + ".samples.jsonl.gz")


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """JSONL, gzipped when the name ends in .gz."""
    with atomic_path(path) as tmp:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(tmp, "wt") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def read_jsonl(path: str | Path, drop_torn_tail: bool = False) -> list[dict]:
    """Rows of a JSONL file. With drop_torn_tail, an unreadable last line (an append cut short by a kill) is
    dropped with a warning; an unreadable line anywhere else is always an error naming the file and row."""
    opener = gzip.open if str(path).endswith(".gz") else open
    rows = []
    with opener(path, "rt") as fh:
        lines = fh.readlines()
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if drop_torn_tail and i == last:
                    log.warning("%s: row %d is torn (a write cut short): dropped", path, i)
                    continue
                raise ValueError(f"{path}: row {i}: not valid JSON ({err.msg})") from None
    return rows


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one line and flush: a killed run keeps every line written before."""
    line = json.dumps(row) + "\n"
    with open(path, "a") as fh:
        if faults.hit("metrics") == "tear":  # test-only: a kill in the middle of this append
            fh.write(line[:len(line) // 2])
            fh.flush()
            faults.kill_now()
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
