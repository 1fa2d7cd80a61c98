"""A job that outlives the Snakemake that started it stops itself.

`snakemake` killed with -9 leaves its jobs running as orphans: nobody collects their outputs, and a rerun's
train job is refused by the trainer lock. `--stop-with PID` (the workflow passes its own Snakemake's pid) makes
the job watch that process; once it is gone the main thread gets a KeyboardInterrupt, the same path as Ctrl-C,
so training stops with one line naming the step and its last checkpoint, and a rerun resumes. (A real signal,
SIGUSR1, not `_thread.interrupt_main`: that one waits for a blocking call to return and does nothing where
SIGINT came ignored, as in a background job.)
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


def _start_time(pid: int) -> Optional[str]:
    """The process's start time (field 22 of /proc/<pid>/stat), so a reused pid is not taken for it; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces


def alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with this pid: not ours any more
        return False
    return started is None or _start_time(pid) == started


def stop_with(pid: int, period_s: float = 2.0, what: str = "this job") -> threading.Event:
    """Watch `pid` in a daemon thread; when it is gone, log one line and interrupt the main thread. Returns an
    event that ends the watch (set it when the job is done). Call it from the main thread."""
    started = _start_time(pid) if os.path.isdir("/proc") else None
    done = threading.Event()
    if not alive(pid, started):
        log.warning("the process to stop with (pid %d) is not running: %s is not watched", pid, what)
        done.set()
        return done

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGUSR1, interrupt)

    def watch() -> None:
        while not done.wait(period_s):
            if not alive(pid, started):
                log.error("the Snakemake that started %s (pid %d) is gone: stopping %s", what, pid, what)
                os.kill(os.getpid(), signal.SIGUSR1)
                return

    threading.Thread(target=watch, name="hdpo-stop-with", daemon=True).start()
    return done
