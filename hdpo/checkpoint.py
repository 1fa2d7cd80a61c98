"""Resumable checkpoints and the run folders' safety checks.

- `save`: one file written atomically, tensor by tensor. torch.save copies a CUDA storage to the host one
  storage at a time while it writes, so neither the host nor the GPU ever holds a second full copy of the
  weights and optimizer states; a full disk is reported as such (torch would say only "unexpected pos"). The
  bytes are hashed as they are written; the sha256 goes to `<file>.sha256` before the file is renamed into
  place (with the digests of the files it may still replace, so a kill between the two renames leaves a pair
  that verifies), and `verify` checks a file against it before a resume.
- `load`: memory-maps the file on the CPU (no full host copy at 1.5B) and leaves placing each tensor to the
  caller's load_state_dict, so a checkpoint written on a GPU resumes on a CPU and the other way round; RNG
  states stay CPU ByteTensors.
- `rng_state` / `set_rng_state`: python, numpy, torch CPU and every CUDA device's generator.
- `RunLock`: one trainer per work dir; a rerun beside the leftover of a killed run stops with its pid.
- `preflight`: write permission and free space for checkpoints and outputs, checked before any work.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from hdpo import faults
from hdpo.io import atomic_path

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """A run cannot go on for a reason the user can act on; the CLI prints the message as one line."""


class DiskFull(RunError):
    pass


# --- sizes and finiteness ----------------------------------------------------------------------------

def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages inside nested dicts/lists/tuples (what torch.save writes)."""
    seen, total = set(), 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            s = o.untyped_storage()
            key = (o.device, s.data_ptr())
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of floating tensors holding an inf or NaN (one device sync per tensor, no full copy)."""
    return [n for n, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def nonfinite_training_state(policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameters and optimizer states holding an inf or NaN, by name."""
    bad = nonfinite_names(policy.named_parameters())
    return bad + [f"optimizer state {k}" for st in optimizer.state.values() for k, v in st.items()
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


# --- RNG -----------------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()  # CPU ByteTensors, one per device
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators on whatever machine resumes: the states are moved to the CPU as ByteTensors
    (a checkpoint mapped onto a GPU would otherwise fail with 'RNG state must be a torch.ByteTensor')."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    cuda = state.get("cuda")
    if torch.cuda.is_available():
        if cuda is None:
            log.warning("the checkpoint holds no CUDA RNG state (written without CUDA): CUDA generators "
                        "start from the step's seed")
            return
        n = torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("the checkpoint holds %d CUDA RNG states, this machine has %d devices: restoring %d",
                        len(cuda), n, min(n, len(cuda)))
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)
    elif cuda:
        log.info("the checkpoint's %d CUDA RNG states are not restored: no CUDA here", len(cuda))


# --- save and load -------------------------------------------------------------------------------------

class _Writer(io.RawIOBase):
    """The file torch.save writes into: keeps the OSError that torch turns into 'unexpected pos', and hosts
    the test-only fault point `checkpoint_write` (once per file, after 64 KiB are on disk)."""

    def __init__(self, fh):
        self.fh, self.written, self.error, self._fault_checked = fh, 0, None, False
        self.sha256 = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            if not self._fault_checked and self.written >= 1 << 16:
                self._fault_checked = True
                self.fh.flush()
                faults.hit("checkpoint_write")
            n = self.fh.write(b)
        except OSError as err:
            self.error = err
            raise
        self.sha256.update(memoryview(b)[:n])
        self.written += n
        return n


def _is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _caused_by_full_disk(err: BaseException) -> bool:
    """A full disk anywhere in the error's chain, shutil.copytree's list of (src, dst, why) included."""
    seen: set[int] = set()
    stack: list = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if _is_disk_full(e) or "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        if isinstance(e, BaseException):
            stack += [e.__cause__, e.__context__]
    return False


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return -1


def save(blob: dict, path: str | Path) -> int:
    """Write `blob` to `path` atomically and durably (fsync before the rename); returns the bytes written.
    The previous file stays in place until the new one is complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            w = _Writer(fh)
            try:
                torch.save(blob, w)
                fh.flush()
                os.fsync(fh.fileno())
                _record_digest(path, w.sha256.hexdigest())
            except (OSError, RuntimeError) as err:
                cause = w.error or err
                if _is_disk_full(cause):
                    raise DiskFull(f"disk full while writing the checkpoint {path}: it needs about "
                                   f"{tensor_bytes(blob)} bytes and {_free_bytes(path.parent)} bytes are free "
                                   f"there (the partial file is removed; the previous checkpoint is kept)"
                                   ) from cause
                if w.error is not None:
                    raise w.error from err
                raise
        written = w.written
    _fsync_dir(path.parent)
    return written


def digest_path(path: str | Path) -> Path:
    return Path(f"{path}.sha256")


def _record_digest(path: Path, digest: str) -> None:
    """The new file's digest first, then those of the files it may still replace (a kill before its rename)."""
    side = digest_path(path)
    known = side.read_text().split() if side.exists() else []
    with atomic_path(side) as tmp:
        tmp.write_text("\n".join([digest, *known[:2]]) + "\n")


class CorruptCheckpoint(RunError):
    pass


def verify(path: str | Path) -> bool:
    """Check `path` against the digests written with it: True if it matches, False if no digest was written
    (a checkpoint of an older version); a mismatch (damaged since it was written) raises CorruptCheckpoint."""
    path, side = Path(path), digest_path(path)
    if not side.exists():
        return False
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() not in side.read_text().split():
        raise CorruptCheckpoint(f"cannot resume from {path}: its bytes do not match the sha256 written with it "
                                f"({side}), so it was damaged after it was written; restore it, or move it away "
                                "to train from step 0")
    return True


def save_training_state(path: str | Path, step: int, best: dict, policy: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler, counters: dict) -> int:
    """A resumable training checkpoint (model, optimizer, scheduler, RNG, step, best-so-far, the run's counters),
    written by `save`; returns the bytes written."""
    blob = {"step": step, "best": best, "model": policy.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "counters": counters}
    return save(blob, path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU, memory-mapped: the caller's load_state_dict copies each tensor to the
    device its parameter lives on, whatever device wrote the file. Tensors kept beyond that (optimizer states
    adopted as-is on a CPU) must be cloned, or they pin the mapped file (see `detach_from_file`)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False)


def detach_from_file(optimizer: torch.optim.Optimizer) -> None:
    """Clone the optimizer states that still live in the mapped checkpoint (CPU runs, and AdamW's CPU step
    counters): otherwise the replaced checkpoint's disk space stays allocated while the run lives."""
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.device.type == "cpu":
                st[k] = v.clone()


# --- one trainer per work dir --------------------------------------------------------------------------

_held: dict[str, int] = {}  # lock path -> fd, for the locks this process holds


class RunLock:
    """An exclusive lock on `folder/.lock` against other processes, held until released or the process dies
    (the kernel drops it then, also after SIGKILL). The file holds the holder's pid, for the message. Within
    one process the lock is shared (sequential trainers on one folder, as in tests)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _held:
            self.fd = _held[key]
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use by another trainer (pid {holder}), e.g. the leftover "
                           f"of a killed run: stop it (kill {holder}) or wait for it, then rerun") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as err:  # a full disk: say which folder, not a bare errno
            os.close(fd)
            raise RunError(f"cannot write the lock file {self.path}: {err.strerror or err}") from err
        self.fd = _held[key] = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            if _held.get(os.path.realpath(self.path)) == self.fd:
                del _held[os.path.realpath(self.path)]
                os.close(self.fd)
            self.fd = None


# --- preflight -----------------------------------------------------------------------------------------

def check_writable(folder: str | Path, what: str) -> None:
    folder = Path(folder)
    taken = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if taken is not None:
        raise RunError(f"cannot write the {what} folder {folder}: {taken} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check.", suffix=".tmp"):
            pass
    except OSError as err:
        raise RunError(f"cannot write the {what} folder {folder}: {err.strerror or err}") from None


def check_space(needs: dict[Path, tuple[int, str]],
                usage: Callable[[Path], Any] = shutil.disk_usage) -> None:
    """needs: folder -> (bytes, what for). Folders on the same filesystem add up; each filesystem must have
    that much free, or a RunError names the folder, the bytes needed and the bytes free."""
    by_fs: dict[int, list[Path]] = {}
    for folder in needs:
        by_fs.setdefault(os.stat(folder).st_dev, []).append(folder)
    for folders in by_fs.values():
        need = sum(needs[f][0] for f in folders)
        free = usage(folders[0]).free
        if free < need:
            parts = "; ".join(f"{f}: {needs[f][1]}" for f in folders)
            raise RunError(f"not enough free space: {free} bytes free but about {need} bytes needed ({parts}); "
                           f"free space or move the folders (checkpoint.dir, the results folder)")


def preflight(work_dir: Path, run_dir: Path, checkpoint_bytes: int, policy_bytes: int,
              usage: Callable[[Path], Any] = shutil.disk_usage, existing_bytes: int = 0) -> None:
    """Before any work: both folders writable, and room for what the run will hold at its fullest. Each file is
    replaced atomically, so the new copy is written while the old one exists: the work dir holds two checkpoints
    and two best policies at once, the run dir the final and best policies (`policy_bytes` with the tokenizer
    and config files). `existing_bytes`: what the work dir already holds of these (a resumed run's checkpoint
    and best policy), already off the free space."""
    check_writable(work_dir, "checkpoint (work)")
    check_writable(run_dir, "run output")
    check_space({work_dir: (2 * (checkpoint_bytes + policy_bytes) - existing_bytes,
                            f"two checkpoints of about {checkpoint_bytes} bytes and two policies of {policy_bytes} "
                            f"while one replaces the other, less {existing_bytes} already there"),
                 run_dir: (2 * policy_bytes, f"two policies of about {policy_bytes} bytes")}, usage)


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of the files in a folder (0 if absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


@contextlib.contextmanager
def disk_full_as_run_error(what: str, path: Path, kept: str):
    """A full disk while writing `path` (an OSError, or shutil.copytree's list of them) as one RunError line
    that says what was kept."""
    try:
        yield
    except Exception as err:  # noqa: BLE001  (safetensors and shutil wrap the OSError in their own types)
        if not _caused_by_full_disk(err):
            raise
        raise DiskFull(f"disk full while writing {what} {path} ({_free_bytes(path.parent)} bytes free there); "
                       f"{kept}; free space and rerun the same command") from err
