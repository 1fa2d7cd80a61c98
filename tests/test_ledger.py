"""The cliff ledger and expand-then-sharpen: pure pieces against hand-made ledgers, then the trainer writing it,
re-injecting former cliffs, and resuming to the same ledger; per-problem validation records; live logging."""
from __future__ import annotations

import gzip
import json
import logging

import pytest

from conftest import tiny_problems
from hdpo import ledger as L
from hdpo.passk import mean_pass_at_k
from test_train import _data, _run


def _row(step, index, distilled=False, reinjected_from=None, rewards=(0.0, 0.0)):
    return {"step": step, "index": index, "rewards": list(rewards), "cliff": sum(rewards) == 0,
            "distilled": distilled, "reinjected_from": reinjected_from}


def test_due_reinjections_delay_cap_order_and_once_only():
    rows = [_row(1, 10, True), _row(1, 11, False), _row(1, 12, True), _row(2, 13, True)]
    assert L.due_reinjections(rows, step=2, delay=2, cap=4) == []  # 1 + 2 > 2
    assert L.due_reinjections(rows, step=3, delay=2, cap=4) == [(10, 1), (12, 1)]  # only distilled cliffs
    assert L.due_reinjections(rows, step=3, delay=2, cap=1) == [(10, 1)]  # oldest first, capped
    # step 3 took 10; 12 waits for room, then 13 becomes due too
    rows += [_row(3, 10, reinjected_from=1, rewards=(1.0, 0.0))]
    assert L.due_reinjections(rows, step=4, delay=2, cap=4) == [(12, 1), (13, 2)]
    # a reinjected prompt that is again a distilled cliff does not return a second time
    rows += [_row(4, 12, True, reinjected_from=1), _row(4, 13, True, reinjected_from=2)]
    assert L.due_reinjections(rows, step=9, delay=2, cap=4) == []
    # the future does not change the past: rows at or after `step` are ignored
    assert L.due_reinjections(rows, step=3, delay=2, cap=4) == [(10, 1), (12, 1)]


def test_place_reinjections_keeps_the_batch_size():
    assert L.place_reinjections([1, 2, 3, 4], [(10, 1), (12, 1)]) == ([1, 2, 10, 12], [None, None, 1, 1])
    assert L.place_reinjections([1, 2], []) == ([1, 2], [None, None])


def test_recovery_counts_former_cliffs_met_again():
    rows = [_row(1, 1), _row(1, 2), _row(2, 1, rewards=(1.0, 0.0)), _row(3, 2), _row(3, 3, rewards=(1.0, 1.0))]
    assert L.recovery(rows) == {"former_cliffs": 2, "met_again": 2, "solved_again": 1}


# --- the trainer ----------------------------------------------------------------------------------------

def _ledger(trainer):
    return [json.loads(l) for l in (trainer.run_dir / "cliffs.jsonl").read_text().splitlines()]


def test_trainer_writes_the_ledger_and_per_problem_validation(tiny_model_dir, tmp_path):
    data = _data(tmp_path, {"7", "8"})
    t = _run(tmp_path, tiny_model_dir, "hdpo", data)
    rows = _ledger(t)
    metrics = [json.loads(l) for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 1, 2, 2]  # 2 prompts per step
    for m in train:
        mine = [r for r in rows if r["step"] == m["step"]]
        assert sum(r["cliff"] for r in mine) == m["cliffs"]
        assert sum(r["privileged_kept"] for r in mine) == m["privileged/kept"]
        assert sum(r["privileged_generated"] for r in mine) == m["privileged/generated"]
        assert m["cliffs/reinjected"] == 0
    for r in rows:
        assert r["cliff"] == (sum(r["rewards"]) == 0) and len(r["rewards"]) == 4
        assert r["distilled"] == (r["privileged_kept"] > 0) and (r["selected"] or not r["distilled"])
        tail = r["teacher_tail_mass"]
        assert (tail is None) == (not r["distilled"])
        if tail:
            assert 0 <= tail["p50"] <= tail["p90"] <= tail["max"] <= 1 and tail["tokens"] > 0
    assert any(r["distilled"] for r in rows)
    summary = json.loads((t.run_dir / "summary.json").read_text())
    assert summary["cliff_ledger"]["cliffs"] == sum(m["cliffs"] for m in train)
    # per-problem validation: one record per validation step, reproducing the val row's pass@k
    with gzip.open(t.run_dir / "val_problems.jsonl.gz", "rt") as fh:
        recs = [json.loads(l) for l in fh]
    vals = [r for r in metrics if r["kind"] == "val"]
    assert [r["step"] for r in recs] == [v["step"] for v in vals] == [0, 2]
    for rec, v in zip(recs, vals):
        val_ids = [p.id for p in tiny_problems() if p.answer in {"7", "8"}][:2]  # _data's val.jsonl
        assert sorted(rec["ids"]) == sorted(val_ids) and len(rec["ids"]) == v["val/num_problems"]
        assert mean_pass_at_k(rec["num_correct"], rec["num_samples"], [1])["pass@1"] == pytest.approx(v["val/pass@1"])


def test_expand_then_sharpen_reinjects_and_resumes_to_the_same_ledger(tiny_model_dir, tmp_path):
    data = _data(tmp_path, {"8"})  # every plain prompt is a cliff; the privileged teacher solves them
    on = {"hdpo.reinject_cliffs_after_steps": 1, "hdpo.reinject_max_per_step": 1, "grpo.max_num_steps": 3}
    full = _run(tmp_path, tiny_model_dir, "full", data, **on)
    rows = _ledger(full)
    first_distilled = [r for r in rows if r["step"] == 1 and r["distilled"]]
    assert first_distilled, "the test needs a distilled cliff at step 1"
    step2 = [r for r in rows if r["step"] == 2]
    back = [r for r in step2 if r["reinjected_from"] is not None]
    assert len(back) == 1 and back[0]["reinjected_from"] == 1 and back[0]["index"] == first_distilled[0]["index"]
    assert len(step2) == 2  # the batch size is unchanged: the returning prompt took the last slot
    # the same run killed after step 2 and resumed: identical ledger (the schedule is a function of it)
    _run(tmp_path, tiny_model_dir, "cut", data, **{**on, "grpo.max_num_steps": 2})
    resumed = _run(tmp_path, tiny_model_dir, "cut", data, resume=True, **on)
    assert _ledger(resumed) == rows
    # switched off, no prompt returns; with the cliff probe on, the earliest former cliffs are sampled again
    off = _run(tmp_path, tiny_model_dir, "off", data, **{"grpo.max_num_steps": 2, "eval.cliff_probe_problems": 2})
    rows = _ledger(off)
    assert all(r["reinjected_from"] is None for r in rows)
    with gzip.open(off.run_dir / "val_problems.jsonl.gz", "rt") as fh:
        probes = [json.loads(l) for l in fh if '"cliff_probe"' in l]
    assert [p["step"] for p in probes] == [2]  # not at step 0: no former cliff yet
    first = sorted({(r["step"], r["index"]) for r in rows if r["cliff"]})
    expected = []
    for _, i in first:
        if i not in expected:
            expected.append(i)
    assert probes[0]["indices"] == expected[:2] and len(probes[0]["num_correct"]) == 2
    val = [json.loads(l) for l in (off.run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    n = probes[0]["num_samples"]
    assert val[-1]["probe/former_cliffs"] == 2
    assert val[-1]["probe/pass@1"] == pytest.approx(sum(probes[0]["num_correct"]) / (2 * n))
    assert "probe/former_cliffs" not in val[0]


def test_one_log_line_per_step_off_a_terminal(tiny_model_dir, tmp_path, caplog):
    data = _data(tmp_path, {"7", "8"})
    with caplog.at_level(logging.INFO, logger="hdpo.train"):
        _run(tmp_path, tiny_model_dir, "log", data, **{"hdpo.distill_weight": 0.0})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ") and "/2 reward" in r.getMessage()]
    assert [l.split()[1] for l in lines] == ["1/2", "2/2"]
    assert any("validating on 2 problems x 2 samples" in r.getMessage() for r in caplog.records)
