"""Test-only fault injection: lets the fault-injection tests make a real `hdpo train` process fail at a named
point, the way a cluster would (SIGKILL, a full disk, a poisoned gradient). Inert unless HDPO_FAULT is set.

    HDPO_FAULT=<action>@<point>:<n>     act on the n-th time (1-based) this process reaches <point>

points: the end of each phase of a training step (rollout, reward, privileged, privileged_reward, teacher, update;
hdpo.step_records.StepClock), grad (after the gradients are summed), checkpoint (after a checkpoint is published),
checkpoint_write (while the checkpoint bytes are written), policy (while a policy folder is written), metrics
(while a metrics line is appended).
actions: kill (SIGKILL this process), sigint (SIGINT, as Ctrl-C), enospc (raise OSError ENOSPC), inf (the trainer
poisons a gradient),
tear (write half of the metrics line, then SIGKILL), hang (sleep until killed, as a stuck job that only the
scheduler's time limit ends).

    HDPO_FAULT_ONCE=<file>     fire only in the first process to get there: it creates <file> (holding its
                               SLURM job id, if any) and a retried job, finding the file, runs clean
"""
from __future__ import annotations

import errno
import math
import os
import signal
import time
from typing import Optional

_counts: dict[str, int] = {}


def _spec() -> Optional[tuple[str, str, int]]:
    raw = os.environ.get("HDPO_FAULT")
    if not raw:
        return None
    try:
        action, rest = raw.split("@", 1)
        point, n = rest.rsplit(":", 1)
        return action, point, int(n)
    except ValueError:
        raise ValueError(f"HDPO_FAULT={raw!r}: expected <action>@<point>:<n>") from None


def hit(point: str) -> Optional[str]:
    """Count a visit of `point`; kill or raise here if the fault names this visit, else return its action
    (for actions the caller performs, like `inf`) or None."""
    spec = _spec()
    if spec is None or spec[1] != point:
        return None
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != spec[2]:
        return None
    once = os.environ.get("HDPO_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        os.write(fd, f"{os.environ.get('SLURM_JOB_ID', '')}\n".encode())
        os.close(fd)
    action = spec[0]
    if action == "hang":
        while True:
            time.sleep(60)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "sigint":
        # as Ctrl-C on a terminal, also where SIGINT came ignored (a background job of a non-interactive shell)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return action


def at_gradients(params) -> None:
    """The `grad` point, once the gradients are summed: action `inf` makes one gradient element overflow while
    the loss stays finite (the trainer must skip or stop before the optimizer step)."""
    if hit("grad") == "inf":
        next(iter(params)).grad.view(-1)[0] = math.inf


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
