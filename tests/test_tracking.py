"""Experiment trackers (hdpo/tracking): W&B in its offline mode and MLflow with a local file store, read back from
what they wrote (W&B's run file, MLflow's client), TensorBoard from its event files; a training run killed and
rerun continues the same tracker runs with no step twice; a missing package is one warning."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, tiny_problems
from hdpo.config import save_config
from hdpo.io import read_jsonl, write_jsonl
from hdpo.tracking import RunInfo, open_trackers, scalars, step_line
from test_faults import _killed, _ok, hdpo_train
from wandb_records import history, of_type, records

STEPS = 4
# a checkpoint every 2 steps, so the kill inside step 4 leaves step 3 logged beyond the checkpoint: the rerun
# trains step 3 again and must not send it twice
SETTINGS = {"grpo.max_num_steps": STEPS, "eval.reward_workers": 1, "eval.val_period": 2,
            "checkpoint.save_period": 2}


def test_step_line_and_scalars():
    row = {"kind": "train", "step": 3, "reward/mean": 0.5, "cliffs": 2, "privileged/kept": 7, "loss/jsd": 0.01,
           "loss/grpo": -0.002, "time/step": 12.34, "teacher_pass_rate": None, "flag": True}
    assert step_line(row, 10) == "step 3/10 reward 0.500 cliffs 2 kept 7 jsd 0.0100 grpo -0.0020 12.3 s/step"
    assert scalars(row) == {"reward/mean": 0.5, "cliffs": 2.0, "privileged/kept": 7.0, "loss/jsd": 0.01,
                            "loss/grpo": -0.002, "time/step": 12.34}


def test_a_missing_tracker_package_is_one_warning(tmp_path, monkeypatch, caplog):
    for name in ("wandb", "mlflow", "mlflow.entities", "mlflow.tracking", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    info = RunInfo("grpo_seed1", "grpo", 1, {}, tmp_path)
    with caplog.at_level(logging.WARNING):
        trackers = open_trackers(["tensorboard", "wandb", "mlflow"], info, tiny_config(tmp_path).tracking,
                                 fresh=True)
        trackers.log({"kind": "train", "step": 1, "reward/mean": 0.5})
        trackers.close()
    assert trackers.backends == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings
    for pip_name in ("tensorboard", "wandb", "mlflow"):
        assert sum(f"pip install {pip_name}" in w for w in warnings) == 1


@pytest.fixture
def tracked_root(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny run logging to all three trackers: W&B offline, MLflow in a file store under tmp_path."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb_config",
                       "WANDB_CACHE_DIR": tmp_path / "wb_cache", "WANDB_DATA_DIR": tmp_path / "wb_data",
                       "MLFLOW_ALLOW_FILE_STORE": "true"}.items():  # MLflow 3 asks for an opt-in to file stores
        monkeypatch.setenv(var, str(value))
    probs = tiny_problems()
    write_jsonl(tmp_path / "data" / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(tmp_path / "data" / "val.jsonl", [p.to_dict() for p in probs[:2]])
    save_config(tiny_config(tiny_model_dir, **SETTINGS, **{
        "run.method": "grpo", "tracking.backends": ["tensorboard", "wandb", "mlflow"],
        "tracking.mlflow_tracking_uri": (tmp_path / "mlruns").as_uri()}), tmp_path / "config.yaml")
    return tmp_path


def test_trackers_get_every_row_once_across_a_kill_and_a_rerun(tracked_root):
    root = tracked_root
    _killed(hdpo_train(root, "run", fault="kill@rollout:4"))  # inside step 4; checkpoint at step 2
    work = root / "work" / "run"
    state = json.loads((work / "trackers.json").read_text())
    # MLflow and TensorBoard store each row at once; W&B's buffered rows count only once its run is closed
    assert {b: s["logged"] for b, s in state.items()} == {"tensorboard": {"val": 2, "train": 3},
                                                         "mlflow": {"val": 2, "train": 3}, "wandb": {}}
    _ok(hdpo_train(root, "run"))
    rows = read_jsonl(root / "runs" / "run" / "metrics.jsonl")
    train_steps, val_steps = ([r["step"] for r in rows if r["kind"] == k] for k in ("train", "val"))
    assert train_steps == [1, 2, 3, 4] and val_steps == [0, 2, 4]
    config = yaml.safe_load((root / "runs" / "run" / "config.yaml").read_text())

    # W&B: one run id across both attempts (one offline folder each); the newest holds every step once (a
    # killed attempt's folder holds what W&B had flushed, if anything: the server drops the steps it has)
    wb = sorted((work / "wandb").glob("offline-run-*"))
    assert len(wb) == 2 and len({p.name.rsplit("-", 1)[1] for p in wb}) == 1
    recs = records(next(wb[-1].glob("run-*.wandb")))
    hist = history(recs)
    logged = [(h["_step"], k) for h in hist for k in h if not k.startswith("_")]
    assert len(logged) == len(set(logged)), "a key was logged twice at one step"
    by_step = {}
    for h in hist:
        by_step.setdefault(h["_step"], {}).update(h)
    for r in rows:  # the same numbers as metrics.jsonl (the timing of a re-trained step aside)
        for k, v in scalars(r).items():
            if not k.startswith("time/"):
                assert by_step[r["step"]][k] == pytest.approx(v), (r["step"], k)
    run = of_type(recs, "run")[0]
    assert run.display_name == "run" and set(run.tags) == {"grpo", "seed1"} and run.run_group == "grpo"
    wb_config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert wb_config["grpo"]["max_num_steps"] == STEPS and wb_config["seed"] == config["seed"]
    last = by_step[STEPS]
    assert last["validation/_type"] == "table-file" and last["curves/_type"] == "image-file"
    summary = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for s in of_type(recs, "summary")
               for i in s.update}
    assert summary["steps"] == STEPS and "final/pass@1" in summary

    # MLflow: one run, the config as parameters, run/method/seed as tags, each step's value once
    from mlflow.tracking import MlflowClient

    client = MlflowClient((root / "mlruns").as_uri())
    exp = client.get_experiment_by_name("hdpo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    run_id = runs[0].info.run_id
    assert {k: runs[0].data.tags[k] for k in ("run", "method", "seed")} == {"run": "run", "method": "grpo",
                                                                         "seed": "1"}
    assert runs[0].data.params["grpo.max_num_steps"] == str(STEPS)
    assert runs[0].data.params["model.dtype"] == "float32"
    for key, kind in (("reward/mean", "train"), ("val/pass_at_1", "val")):
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        want = [(r["step"], r[key.replace("_at_", "@")]) for r in rows if r["kind"] == kind]
        assert [step for step, _ in sorted(got)] == [step for step, _ in want], key
        assert [v for _, v in sorted(got)] == pytest.approx([v for _, v in want]), key
    assert {a.path for a in client.list_artifacts(run_id)} >= {"validation.json", "curves.png"}
    (root / "dl").mkdir()
    table = json.loads(Path(client.download_artifacts(run_id, "validation.json", str(root / "dl"))).read_text())
    assert [r[0] for r in table["data"]] == val_steps

    # TensorBoard: each step's scalar once across both attempts' event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in (work / "tensorboard").glob("events.out.tfevents.*"):  # one file per attempt
        acc = EventAccumulator(str(path))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("reward/mean")]
    assert sorted(steps) == [1, 2, 3, 4]
