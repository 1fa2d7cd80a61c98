"""Fault injection on the real CLI: `python -m hdpo train` in subprocesses on a tiny model, killed by SIGKILL at
named points (hdpo/faults.py), fed a torn metrics line, stale temp siblings, an inf gradient and a full disk.
Each rerun must end identical to one uninterrupted run (metrics, summary, both policies' weights), or stop at
once with the promised one-line message; no process of a run may outlive it, nothing stale may stay behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tagged_processes, tiny_config, tiny_problems
from hdpo.checkpoint import RunLock
from hdpo.config import save_config
from hdpo.io import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
# a reward worker process in every run, so that orphans would show; a checkpoint every step
SETTINGS = {"grpo.max_num_steps": STEPS, "eval.reward_workers": 1, "eval.val_period": 2,
            "checkpoint.save_period": 1}


@pytest.fixture(scope="module")
def root(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    probs = tiny_problems()
    write_jsonl(root / "data" / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(root / "data" / "val.jsonl", [p.to_dict() for p in probs[:2]])
    save_config(tiny_config(tiny_model_dir, **SETTINGS), root / "config.yaml")
    return root


def hdpo_train(root: Path, name: str, fault: str | None = None, settings: tuple[str, ...] = (),
               run_dir: Path | None = None) -> subprocess.CompletedProcess:
    """One `hdpo train --resume` run; afterwards no process it started may be alive (waits up to 15 s for the
    reward worker to notice that its parent is gone)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "HDPO_TEST_TAG": tag, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    env.pop("HDPO_FAULT", None)
    if fault:
        env["HDPO_FAULT"] = fault
    cmd = [sys.executable, "-m", "hdpo", "train", "--config", str(root / "config.yaml"), "--data",
           str(root / "data"), "--run-dir", str(run_dir or root / "runs" / name), "--work-dir",
           str(root / "work" / name), "--model-cache", str(root / "models"), "--resume", "--threads", "1"]
    if settings:
        cmd += ["--set", *settings]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    deadline = time.time() + 15
    while tagged_processes(tag) and time.time() < deadline:
        time.sleep(0.2)
    left = tagged_processes(tag)
    assert not left, f"processes of the run outlived it: {left}\n{proc.stderr[-3000:]}"
    return proc


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _killed(proc):
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-4000:])
    return proc


def outcome(root: Path, name: str) -> dict:
    run = root / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("wall_s"), summary.pop("run"), summary.pop("work_dir")
    summary["totals"] = {k: v for k, v in summary["totals"].items() if not k.startswith("time/")}
    return {"metrics": [{k: v for k, v in r.items() if not k.startswith("time/")}
                        for r in read_jsonl(run / "metrics.jsonl")],
            "summary": summary,
            "final": load_file(run / "policy_final" / "model.safetensors"),
            "best": load_file(run / "policy_best" / "model.safetensors")}


def assert_same(a: dict, b: dict) -> None:
    assert a["metrics"] == b["metrics"]
    assert a["summary"] == b["summary"]
    for which in ("final", "best"):
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), f"{which} policy differs in {k}"


def assert_nothing_stale(root: Path, name: str) -> None:
    for folder in (root / "work" / name, root / "runs" / name):
        stale = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]
        assert not stale, f"{folder}: stale siblings {stale}"


@pytest.fixture(scope="module")
def reference(root) -> dict:
    """The one uninterrupted run every faulty run is compared with."""
    _ok(hdpo_train(root, "reference"))
    ref = outcome(root, "reference")
    train = [r for r in ref["metrics"] if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert any(r["grad_norm"] > 0 for r in train)  # the trajectory moves, so a wrong resume would show
    return ref


# --- one run through every fault ----------------------------------------------------------------------
# One run is hit by each fault in turn and rerun each time (as a scheduler would); it must end identical to the
# reference. (One chain instead of one run per fault keeps the suite to a few minutes on 2 cores.)

def test_a_run_survives_kills_stale_files_torn_lines_full_disk_and_inf_gradients(root, reference):
    work, name = root / "work" / "chain", "chain"
    ckpt_step = lambda: torch.load(work / "checkpoint.pt", weights_only=False)["step"]  # noqa: E731

    # 1. SIGKILL during the rollouts of step 3 (after step 2's checkpoint)
    _killed(hdpo_train(root, name, "kill@rollout:3"))
    assert ckpt_step() == 2

    # 2. what kills leave elsewhere: a checkpoint's temp file, and the best policy between the two renames of
    #    a folder swap (the previous version moved aside, the new one half-written); the rerun must clean and
    #    restore them, and is itself SIGKILLed while writing step 3's checkpoint
    assert (work / "policy_best").is_dir()
    (work / ".checkpoint.pt.k2ll3d.tmp").write_bytes(b"\0" * 4096)
    os.replace(work / "policy_best", work / ".policy_best.old")
    (work / ".policy_best.tmp").mkdir()
    (work / ".policy_best.tmp" / "model.safetensors").write_bytes(b"half")
    proc = _killed(hdpo_train(root, name, "kill@checkpoint_write:1"))
    assert "restored policy_best from .policy_best.old" in proc.stderr
    assert (work / "policy_best").is_dir() and not (work / ".policy_best.old").exists()
    assert not (work / ".policy_best.tmp").exists() and not (work / ".checkpoint.pt.k2ll3d.tmp").exists()
    assert len(list(work.glob(".checkpoint.pt.*.tmp"))) == 1, "the kill should leave a partial checkpoint"
    assert ckpt_step() == 2

    # 3. SIGKILL in the middle of appending step 4's metrics row (rerun from step 2: rows 3 and 4)
    _killed(hdpo_train(root, name, "tear@metrics:2"))
    lines = (work / "metrics.jsonl").read_text().splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[-1])
    assert ckpt_step() == 3 and not list(work.glob(".checkpoint.pt.*.tmp"))

    # 4. the disk fills up while step 4's checkpoint is written: the rerun drops the torn row, then stops
    proc = hdpo_train(root, name, "enospc@checkpoint_write:1")
    assert "row 6 is torn" in proc.stderr
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"hdpo: disk full while writing the checkpoint {work / 'checkpoint.pt'}")
    assert ckpt_step() == 3 and not list(work.glob(".checkpoint.pt.*.tmp"))

    # 5. an inf gradient (finite loss) in step 4: stop before the optimizer, name the last good checkpoint
    proc = hdpo_train(root, name, "inf@grad:1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("hdpo: step 4: non-finite gradient norm") and "before the optimizer step" in message
    assert f"{work / 'checkpoint.pt'} (step 3)" in message
    blob = torch.load(work / "checkpoint.pt", weights_only=False)
    assert blob["step"] == 3 and all(torch.isfinite(t).all() for t in blob["model"].values())

    # 6. a clean rerun ends exactly where the uninterrupted run did, counters included, nothing stale
    _ok(hdpo_train(root, name))
    assert_same(outcome(root, name), reference)
    assert_nothing_stale(root, name)


# --- non-finite gradients -----------------------------------------------------------------------------

def test_inf_gradient_can_be_skipped_and_counted(root, reference):
    _ok(hdpo_train(root, "skip", "inf@grad:3", settings=("optimizer.on_nonfinite=skip",)))
    got = outcome(root, "skip")
    train = [r for r in got["metrics"] if r["kind"] == "train"]
    assert [r["nonfinite_skipped"] for r in train] == [0, 0, 1, 0]
    assert train[2]["grad_norm"] is None and got["summary"]["totals"]["nonfinite_skipped"] == 1
    assert got["metrics"][:4] == reference["metrics"][:4]  # identical up to the skipped step
    assert all(torch.isfinite(t).all() for t in got["final"].values())


# --- disks and folders --------------------------------------------------------------------------------

def test_unwritable_run_folder_stops_before_any_work(root):
    blocker = root / "not_a_folder"
    blocker.write_text("a file where the results folder should be")
    proc = hdpo_train(root, "blocked", run_dir=blocker / "run")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert f"cannot write the run output folder {blocker / 'run'}" in proc.stderr
    assert not (root / "work" / "blocked" / "metrics.jsonl").exists()  # not even the step-0 validation


def test_rerun_beside_a_live_leftover_refuses(root):
    lock = RunLock(root / "work" / "busy").acquire()  # this test process plays the killed run's leftover
    try:
        proc = hdpo_train(root, "busy")
    finally:
        lock.release()
    assert proc.returncode == 1 and f"in use by another trainer (pid {os.getpid()})" in proc.stderr
    assert not (root / "work" / "busy" / "metrics.jsonl").exists()


def test_a_damaged_checkpoint_is_refused_at_load_in_one_line(root):
    """A checkpoint that loads but holds damaged values is refused before any step trains on it: bytes changed
    after the write (the sha256 written beside it disagrees), or a NaN weight in a file whose digest matches
    (saved so by hand); the message names the file and the way out."""
    from hdpo import checkpoint as ckpt

    work = root / "work" / "damaged"
    _killed(hdpo_train(root, "damaged", "kill@rollout:2"))  # step 1's checkpoint on disk
    path = work / "checkpoint.pt"
    good = path.read_bytes()
    middle = len(good) // 2
    path.write_bytes(good[:middle] + b"\xff" * 4096 + good[middle + 4096:])
    proc = hdpo_train(root, "damaged")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"hdpo: cannot resume from {path}: its bytes do not match the sha256 written with it ({path}.sha256), "
        "so it was damaged after it was written; restore it, or move it away to train from step 0")

    path.write_bytes(good)
    blob = torch.load(path, weights_only=False)
    next(iter(blob["model"].values())).view(-1)[0] = float("nan")
    ckpt.save(blob, path)
    proc = hdpo_train(root, "damaged")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"hdpo: cannot resume from {path}: it holds non-finite values (")
    assert torch.load(path, weights_only=False)["step"] == 1  # refused, not overwritten


def test_ctrl_c_and_a_full_disk_while_publishing_end_in_one_line(root):
    """Ctrl-C (SIGINT) in the middle of a step says where it stopped and how to go on; a full disk while a policy
    folder is written says what was kept; the rerun finishes the same run."""
    work = root / "work" / "interrupted"
    proc = hdpo_train(root, "interrupted", "sigint@rollout:3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"hdpo: interrupted during step 3; the last good checkpoint is {work / 'checkpoint.pt'} (step 2): rerun "
        "the same command (with --resume) to continue")
    # step 2 is a validation step with a new best policy, written to the work dir: the disk fills up there
    proc = hdpo_train(root, "interrupted", "enospc@policy:1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("hdpo: disk full while writing the policy ") and "free space and rerun" in message
    _ok(hdpo_train(root, "interrupted"))
    assert_nothing_stale(root, "interrupted")


def test_two_trainers_cannot_publish_into_one_run_folder(root):
    """Another work folder, the same --run-dir: refused while a live trainer holds the run folder, before it
    writes anything (this test process plays the live trainer)."""
    shared = root / "runs" / "shared"
    lock = RunLock(shared).acquire()
    try:
        proc = hdpo_train(root, "second", run_dir=shared)
    finally:
        lock.release()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert f"{shared} is in use by another trainer (pid {os.getpid()})" in proc.stderr
    assert not (root / "work" / "second" / "metrics.jsonl").exists()


def test_a_bad_row_inside_the_work_folders_metrics_is_named_with_the_fix(root):
    """Not a torn last line (a kill), a damaged row in the middle: resume stops in one line naming the file,
    the row and what to do, and leaves the file as it was."""
    work = root / "work" / "badrow"
    _killed(hdpo_train(root, "badrow", "kill@rollout:3"))
    metrics = work / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"
    metrics.write_text("".join(lines))
    proc = hdpo_train(root, "badrow")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"hdpo: {metrics}: row 2: not valid JSON") and "repair or delete that row" in message
    assert metrics.read_text() == "".join(lines)


def test_a_trainer_whose_snakemake_is_gone_stops_and_a_rerun_resumes(root):
    """`--stop-with PID` (the workflow passes its Snakemake's pid): once that process is gone (kill -9 of
    snakemake), the orphaned trainer stops within seconds, saying where, into the work dir's log; the rerun
    resumes from its checkpoint. Meanwhile a second trainer on the same folders is refused and leaves the live
    trainer's log as it was."""
    work = root / "work" / "orphan"
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # plays snakemake
    env = {**os.environ, "PYTHONPATH": str(REPO), "HDPO_FAULT": "hang@checkpoint:1"}  # a long step 2
    cmd = [sys.executable, "-m", "hdpo", "train", "--config", str(root / "config.yaml"), "--data",
           str(root / "data"), "--run-dir", str(root / "runs" / "orphan"), "--work-dir", str(work),
           "--model-cache", str(root / "models"), "--resume", "--threads", "1"]
    trainer = subprocess.Popen([*cmd, "--stop-with", str(parent.pid)], env=env, stderr=subprocess.PIPE, text=True,
                               cwd=REPO)
    try:
        log = work / "train.log"
        deadline = time.time() + 300
        while not (log.exists() and "checkpoint at step 1" in log.read_text()) and time.time() < deadline:
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            time.sleep(0.2)
        before = log.read_text()
        refused = hdpo_train(root, "orphan")  # the rerun of a killed Snakemake, beside the live trainer
        assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == (
            f"hdpo: {work} is in use by another trainer (pid {trainer.pid}), e.g. the leftover of a killed run: "
            f"stop it (kill {trainer.pid}) or wait for it, then rerun (its log: {log})")
        assert log.read_text() == before  # the live trainer's log, untouched by the refused one

        parent.kill()
        parent.wait()
        started = time.time()
        assert trainer.wait(timeout=30) == 1
        stopped_after = time.time() - started
    finally:
        parent.kill()
        trainer.kill()
    err = trainer.stderr.read()
    assert stopped_after < 10 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"hdpo: interrupted during step 2; the last good checkpoint is {work / 'checkpoint.pt'} (step 1): rerun "
        "the same command (with --resume) to continue")
    text = log.read_text()
    assert f"the Snakemake that started hdpo train (pid {parent.pid}) is gone: stopping hdpo train" in text
    _ok(hdpo_train(root, "orphan"))
    text = log.read_text()
    assert text.startswith(before) and re.search(r"resumed from .* at step 1", text)  # appended, never truncated


def test_retention_shows_and_frees_superseded_folders_and_finished_state(root):
    """`hdpo clean`: every work folder of <checkpoint.dir>/<run>/ with its status and size; with --apply, the
    policy's choices freed (superseded folders; a finished run's checkpoint), never a folder in use or one
    newer than the published run, never the published policies. keep_finished_state off: the trainer frees its
    own checkpoint when the run is published."""
    runs = root / "res" / "runs"
    run_dir = runs / "kept"
    _ok(hdpo_train(root, "kept/old", run_dir=run_dir))  # earlier settings
    time.sleep(1.1)  # mtimes: the next publication is strictly newer than everything of the old folder
    proc = _ok(hdpo_train(root, "kept/new", run_dir=run_dir, settings=("checkpoint.keep_finished_state=false",)))
    new = root / "work" / "kept" / "new"
    assert not (new / "checkpoint.pt").exists() and not (new / "policy_best").exists()
    assert "checkpoint.keep_finished_state is off: freed" in proc.stderr
    assert (run_dir / "policy_final" / "model.safetensors").exists() and (run_dir / "policy_best").is_dir()
    assert json.loads((run_dir / "summary.json").read_text())["work_dir"] == str(new)
    time.sleep(1.1)
    (root / "work" / "kept" / "pending").mkdir()  # a newer trajectory, stopped: a rerun resumes it
    (root / "work" / "kept" / "pending" / "checkpoint.pt").write_bytes(b"x" * 10)
    busy = RunLock(root / "work" / "kept" / "busy").acquire()  # a live trainer's folder

    def clean(*extra: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "hdpo", "clean", "--config", str(root / "config.yaml"),
                               "--results", str(root / "res"), "--set", f"checkpoint.dir={root / 'work'}",
                               "checkpoint.keep_superseded=false", *extra],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    try:
        old_bytes = sum(f.stat().st_size for f in (root / "work" / "kept" / "old").rglob("*") if f.is_file())
        shown = clean()
        rows = {line.split("|")[1].strip(): line for line in shown.splitlines() if line.startswith("| /")}
        assert "| superseded |" in rows[str(root / "work" / "kept" / "old")] and rows[
            str(root / "work" / "kept" / "old")].endswith("| free |")
        assert "published (finished state already freed)" in rows[str(new)] and rows[str(new)].endswith("| keep |")
        assert "| pending |" in rows[str(root / "work" / "kept" / "pending")]
        assert "| in use |" in rows[str(root / "work" / "kept" / "busy")]
        assert "(nothing deleted: add --apply)" in shown and (root / "work" / "kept" / "old").is_dir()
        applied = clean("--apply")
        assert not (root / "work" / "kept" / "old").exists()
        from hdpo.retention import human

        assert f"freed {human(old_bytes)}" in applied
        assert all((root / "work" / "kept" / n).is_dir() for n in ("new", "pending", "busy"))
        assert (new / "metrics.jsonl").exists() and (run_dir / "policy_final" / "model.safetensors").exists()
    finally:
        busy.release()
