"""The pieces behind fault tolerance, in-process and fast: folder swaps recover from a kill at every point,
torn JSONL lines, checkpoints that move between devices with their RNG states, free-space and lock checks,
reward workers that die with their parent."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tagged_processes

from hdpo import checkpoint as ckpt
from hdpo import io as hio

REPO = Path(__file__).resolve().parents[1]


# --- atomic folder swaps: a kill at any point leaves a recoverable state -------------------------------

class _Killed(BaseException):
    pass


def _write(folder: Path, version: str) -> None:
    (folder / "a.txt").write_text(version)
    (folder / "b.txt").write_text(version * 2)


def _content(folder: Path) -> str | None:
    if not folder.exists():
        return None
    a, b = (folder / "a.txt").read_text(), (folder / "b.txt").read_text()
    assert b == a * 2, f"{folder} is half-written"
    return a


def _swap_killed_at(tmp_path: Path, k: int, monkeypatch, had_previous: bool) -> tuple[str | None, bool]:
    """Run one atomic_dir publish whose k-th filesystem step raises (a kill); returns what recovery yields."""
    target = tmp_path / f"pol{k}{had_previous}"
    if had_previous:
        with hio.atomic_dir(target) as t:
            _write(t, "old")
    calls = {"n": 0}
    real = {"replace": os.replace, "rmtree": hio.shutil.rmtree, "write": _write}

    def step(name):
        def run(*a, **kw):
            calls["n"] += 1
            if calls["n"] == k:
                raise _Killed()
            return real[name](*a, **kw)
        return run

    monkeypatch.setattr(hio.os, "replace", step("replace"))
    monkeypatch.setattr(hio.shutil, "rmtree", step("rmtree"))
    finished = True
    try:
        with hio.atomic_dir(target) as t:
            step("write")(t, "new")
    except _Killed:
        finished = False
    monkeypatch.undo()
    hio.recover_dir(target)
    siblings = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]
    assert not siblings, f"killed at step {k}: stale {siblings}"
    return _content(target), finished


@pytest.mark.parametrize("had_previous", [True, False])
def test_folder_swap_recovers_from_a_kill_at_every_step(tmp_path, monkeypatch, had_previous):
    seen = set()
    for k in range(1, 12):
        got, finished = _swap_killed_at(tmp_path, k, monkeypatch, had_previous)
        # always complete: the new version once it was fully written, else the previous one (or nothing)
        assert got in ("new", "old" if had_previous else None), (k, got)
        seen.add(got)
        if finished:
            assert got == "new"
            break
    assert "new" in seen and (not had_previous or "old" in seen)


def test_leftover_old_of_the_previous_protocol_is_restored_or_dropped(tmp_path):
    target = tmp_path / "policy_best"
    (tmp_path / ".policy_best.old").mkdir()
    _write(tmp_path / ".policy_best.old", "old")
    (tmp_path / ".policy_best.tmp").mkdir()  # maybe complete, maybe not: cannot be trusted
    assert hio.clean_stale(tmp_path)
    assert _content(target) == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["policy_best"]
    (tmp_path / ".policy_best.old").mkdir()  # a cleanup cut short beside a complete folder
    with hio.atomic_dir(target) as t:  # used to fail with "Directory not empty"
        _write(t, "new")
    assert _content(target) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["policy_best"]


def test_clean_stale_removes_temp_files_only(tmp_path):
    (tmp_path / ".checkpoint.pt.x1y2z3.tmp").write_bytes(b"partial")
    (tmp_path / "checkpoint.pt").write_bytes(b"good")
    (tmp_path / ".lock").write_text("1")
    assert hio.clean_stale(tmp_path) == [".checkpoint.pt.x1y2z3.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint.pt"]


# --- torn JSONL lines ------------------------------------------------------------------------------------

def test_torn_last_line_is_dropped_but_torn_inner_line_names_file_and_row(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    with pytest.raises(ValueError, match=r"metrics.jsonl: row 3: not valid JSON"):
        hio.read_jsonl(path)
    assert hio.read_jsonl(path, drop_torn_tail=True) == [{"step": 1}, {"step": 2}]
    assert "row 3 is torn" in caplog.text
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"{path}: row 2: not valid JSON"):
        hio.read_jsonl(path, drop_torn_tail=True)


# --- checkpoints across devices ---------------------------------------------------------------------------

def _trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    return model, opt


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """Storages tagged 'cuda:0' (as a GPU run writes them) load here, on a machine without CUDA, and every
    generator continues where it was saved."""
    model, opt = _trained()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": ckpt.rng_state()}
    expected = _draws()
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    ckpt.save(blob, tmp_path / "checkpoint.pt")
    monkeypatch.undo()
    if not torch.cuda.is_available():  # the file really claims a GPU: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "checkpoint.pt", weights_only=False)

    loaded = ckpt.load(tmp_path / "checkpoint.pt")
    assert loaded["rng"]["torch"].device.type == "cpu" and loaded["rng"]["torch"].dtype == torch.uint8
    fresh, fresh_opt = _trained(seed=5)
    fresh.load_state_dict(loaded["model"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    ckpt.detach_from_file(fresh_opt)
    ckpt.set_rng_state(loaded["rng"])
    assert _draws() == expected
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for s in fresh_opt.state.values():  # nothing still reads from the mapped file
        assert all(not isinstance(v, torch.Tensor) or v.untyped_storage().nbytes() == v.nbytes
                   for v in s.values())


def test_rng_states_are_restored_from_any_tensor_form(tmp_path):
    """set_rng_state takes the torch state as a CPU ByteTensor whatever form the load left it in (a
    map_location=<cuda> load used to hand it over on the GPU), and ignores CUDA states where there is no CUDA."""
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    state = ckpt.rng_state()
    expected = _draws()
    torch.save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=False, map_location=lambda storage, loc: storage)
    loaded["rng"]["torch"] = loaded["rng"]["torch"].to(torch.int64)  # not a ByteTensor any more
    if not torch.cuda.is_available():
        loaded["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    ckpt.set_rng_state(loaded["rng"])
    assert _draws() == expected


def test_disk_full_while_saving_keeps_the_previous_file(tmp_path, monkeypatch):
    ckpt.save({"w": torch.zeros(10)}, tmp_path / "checkpoint.pt")
    monkeypatch.setenv("HDPO_FAULT", "enospc@checkpoint_write:1")
    monkeypatch.setattr(ckpt.faults, "_counts", {})
    with pytest.raises(ckpt.DiskFull, match=r"disk full while writing the checkpoint .*checkpoint.pt: it needs "
                                            r"about 4000000 bytes"):
        ckpt.save({"w": torch.ones(10**6)}, tmp_path / "checkpoint.pt")
    assert torch.equal(torch.load(tmp_path / "checkpoint.pt")["w"], torch.zeros(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    assert ckpt.verify(tmp_path / "checkpoint.pt")


def test_saved_checkpoints_verify_and_damage_is_caught(tmp_path):
    """The sha256 of the bytes written is recorded beside the file before it is renamed into place, with the
    digests of the files it may replace: a kill between the two renames leaves a pair that still verifies."""
    path = tmp_path / "checkpoint.pt"
    ckpt.save({"w": torch.arange(10.0)}, path)
    assert ckpt.verify(path)
    first = path.read_bytes()
    ckpt.save({"w": torch.arange(10.0) * 2}, path)
    assert ckpt.verify(path) and len(ckpt.digest_path(path).read_text().split()) == 2
    path.write_bytes(first)  # the new digest recorded, the rename not done: the previous file still verifies
    assert ckpt.verify(path)
    damaged = bytearray(first)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(ckpt.CorruptCheckpoint, match=f"cannot resume from {path}: its bytes do not match"):
        ckpt.verify(path)
    ckpt.digest_path(path).unlink()  # written by a version without digests: unverified, not refused
    assert ckpt.verify(path) is False


def test_save_streams_from_the_live_tensors(tmp_path):
    """The bytes written are the tensors' bytes, a shared storage once (torch.save reads each storage in place;
    that no second copy is held is measured by `scripts/benchmark.py --checkpoint`, not asserted here)."""
    blob = {"a": torch.randn(1000, 100), "b": [torch.randn(50)], "tied": None}
    blob["tied"] = blob["a"]  # shared storage counted once
    n = ckpt.save(blob, tmp_path / "c.pt")
    assert ckpt.tensor_bytes(blob) == (1000 * 100 + 50) * 4
    assert ckpt.tensor_bytes(blob) <= n < ckpt.tensor_bytes(blob) + 64 * 1024


# --- preflight and locks ------------------------------------------------------------------------------

def test_free_space_check_names_folder_and_bytes(tmp_path):
    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir(), run.mkdir()
    free = lambda n: lambda path: SimpleNamespace(free=n)  # noqa: E731
    # same filesystem: 2 * (600 + 100) (work: old and new copies during an atomic replace) + 2 * 100 (run) = 1600
    with pytest.raises(ckpt.RunError, match=r"1599 bytes free but about 1600 bytes needed \(.*work: two checkpoints "
                                            r"of about 600 bytes and two policies of 100"):
        ckpt.preflight(work, run, checkpoint_bytes=600, policy_bytes=100, usage=free(1599))
    ckpt.preflight(work, run, checkpoint_bytes=600, policy_bytes=100, usage=free(1600))
    # a resumed run's checkpoint and best policy are already on disk (and off the free space)
    ckpt.preflight(work, run, checkpoint_bytes=600, policy_bytes=100, usage=free(900), existing_bytes=700)


def test_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ckpt.RunError, match=rf"cannot write the run output folder {blocker / 'run'}"):
        ckpt.check_writable(blocker / "run", "run output")


def test_lock_is_exclusive_between_processes_and_freed_by_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hdpo.checkpoint import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ckpt.RunError, match=rf"in use by another trainer \(pid {holder.pid}\)"):
            ckpt.RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    ckpt.RunLock(tmp_path).acquire().release()  # the kernel dropped the dead holder's lock


# --- reward workers die with their parent ---------------------------------------------------------------

def test_reward_workers_die_when_their_parent_is_sigkilled():
    tag = uuid.uuid4().hex
    code = ("from hdpo.reward import RewardScorer\nimport time\n"
            "if __name__ == '__main__':\n"
            "    s = RewardScorer(2)\n    s.score(['\\\\boxed{1}'], ['1'])\n    print('ready', flush=True)\n"
            "    time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "HDPO_TEST_TAG": tag, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout.readline().strip() == "ready"
        assert len(tagged_processes(tag)) >= 3  # the parent, its workers (and the resource tracker)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.time() + 15
    while tagged_processes(tag) and time.time() < deadline:
        time.sleep(0.2)
    assert not tagged_processes(tag)


def test_a_full_disk_while_taking_the_lock_names_the_lock_file(tmp_path, monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "write", full)
    with pytest.raises(ckpt.RunError, match=r"cannot write the lock file .*\.lock: No space left on device"):
        ckpt.RunLock(tmp_path / "work").acquire()
    monkeypatch.undo()
    lock = ckpt.RunLock(tmp_path / "work").acquire()  # nothing held: the next trainer takes it
    lock.release()
