"""Every user mistake of issue 10 stops the real CLI with one line that names the file, variable or key, and
no traceback; nothing that would silently produce a meaningless number is accepted."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hdpo.config import ConfigError, from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "config" / "demo.yaml")


def hdpo(*args, env=None) -> tuple[int, list[str]]:
    """Exit code and the stderr lines that are not log records."""
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "hdpo", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    lines = [l for l in proc.stderr.splitlines() if l.strip() and not any(
        f" {lvl} " in l for lvl in ("INFO", "WARNING", "DEBUG"))]
    return proc.returncode, lines


def one_line_error(code: int, lines: list[str], *needles: str) -> str:
    assert code != 0
    assert len(lines) == 1 and not any("Traceback" in l for l in lines), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _hub_reachable() -> bool:
    from hdpo.data import _check_hub

    try:
        _check_hub("probe")
    except ConnectionError:
        return False
    return True


needs_no_hub = pytest.mark.skipif(_hub_reachable(), reason="the Hugging Face Hub is reachable from here")


def test_missing_config_file(tmp_path):
    one_line_error(*hdpo("prepare-data", "--config", "config/nope.yaml", "--out", str(tmp_path)), "config/nope.yaml")


def test_unknown_format_names_the_key(tmp_path):
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path),
                         "--set", "benchmarks.math500.format=math-500"),
                   "benchmarks.math500.format", "'math-500'", "math500")


def test_missing_data_folder(tmp_path):
    one_line_error(*hdpo("train", "--config", DEMO, "--method", "grpo", "--data", str(tmp_path / "nodata"),
                         "--run-dir", str(tmp_path / "run"), "--work-dir", str(tmp_path / "work")),
                   str(tmp_path / "nodata" / "train.jsonl"), "prepare-data")
    assert not (tmp_path / "run").exists()


def test_unknown_method(tmp_path):
    one_line_error(*hdpo("train", "--config", DEMO, "--method", "hdpo_warm", "--data", str(tmp_path),
                         "--run-dir", str(tmp_path / "run"), "--work-dir", str(tmp_path / "work")),
                   "'hdpo_warm'", "experiment.methods")


@pytest.mark.parametrize("value", ["-1", "0", "512", "4096"])
def test_generation_budget_beyond_the_sequence_length(tmp_path, value):
    """demo: max_total_sequence_length 512; a budget >= it leaves the prompt no room (answers cut to ~1 token)."""
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path),
                         "--set", f"generation.max_new_tokens={value}"),
                   "generation.max_new_tokens", "model.max_total_sequence_length=512")
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        load_config(DEMO, [f"eval.max_new_tokens={value}"])
    assert load_config(DEMO, ["generation.max_new_tokens=511"]).generation.max_new_tokens == 511


def test_empty_benchmark_file(tmp_path, data_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    env = dict(os.environ, HDPO_DATA_DIR=str(data_dir))
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path / "data"),
                         "--set", f"benchmarks.math500.path={empty}", env=env), str(empty), "no rows", "math500")
    assert not (tmp_path / "data" / "benchmarks").exists()


def test_empty_prepared_benchmark_is_refused_by_evaluate(tmp_path):
    """A benchmark file emptied after prepare-data: evaluate stops instead of writing pass@1 = NaN."""
    data = tmp_path / "data"
    (data / "benchmarks").mkdir(parents=True)
    (data / "benchmarks" / "math500.jsonl").write_text("")
    model = tmp_path / "policy"
    model.mkdir()
    out = tmp_path / "eval" / "math500.json"
    one_line_error(*hdpo("evaluate", "--config", DEMO, "--model", str(model), "--benchmark", "math500",
                         "--data", str(data), "--out", str(out)), "math500.jsonl", "no problems")
    assert not out.exists()


def test_missing_policy_folder(tmp_path):
    one_line_error(*hdpo("evaluate", "--config", DEMO, "--model", str(tmp_path / "policy_final"), "--benchmark",
                         "math500", "--data", str(tmp_path), "--out", str(tmp_path / "x.json")),
                   str(tmp_path / "policy_final"))


def test_empty_training_file_names_the_file(tmp_path):
    empty = tmp_path / "train_rows.jsonl"
    empty.write_text("\n")
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path / "data"),
                         "--set", f"data.train=[{{format: svamp, path: {empty}}}]"), str(empty), "no rows")


def test_model_folder_that_does_not_exist(tmp_path, tiny_data):
    one_line_error(*hdpo("train", "--config", DEMO, "--method", "grpo", "--data", str(tiny_data),
                         "--run-dir", str(tmp_path / "run"), "--work-dir", str(tmp_path / "work"),
                         "--set", f"model.name={tmp_path / 'no-such-model'}", "model.gguf_file=null"),
                   "model.name", "no-such-model", "not a folder")


@needs_no_hub
def test_hub_model_without_network_fails_at_once(tmp_path, tiny_data):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    one_line_error(*hdpo("train", "--config", DEMO, "--method", "grpo", "--data", str(tiny_data),
                         "--run-dir", str(tmp_path / "run"), "--work-dir", str(tmp_path / "work"),
                         "--set", "model.name=Qwen/Qwen2.5-Math-1.5B-Instruct", "model.gguf_file=null", env=env),
                   "model.name", "Qwen/Qwen2.5-Math-1.5B-Instruct", "not reachable", "HF_HUB_OFFLINE")


@needs_no_hub
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_wrong_data_dir_names_the_variable(tmp_path, where):
    """The demo's mirrors looked for in a wrong HDPO_DATA_DIR: the message names the variable and the file, and
    does not tell someone already on config/demo.yaml to use it."""
    folder = tmp_path / "mirrors"
    if where == "empty":
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env["HDPO_DATA_DIR"] = str(folder)
    line = one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path / "data"), env=env),
                          f"HDPO_DATA_DIR={folder}", "svamp_test.jsonl")
    assert "demo.yaml" not in line
    assert ("is not a folder" in line) == (where == "missing")


@needs_no_hub
def test_unset_data_dir_names_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                              "HDPO_DATA_DIR")}
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path / "data"), env=env),
                   "HDPO_DATA_DIR is not set", "svamp_test.jsonl")


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c["hdpo"].__setitem__("method", "grpo"), "hdpo.method: removed"),
    (lambda c: c["experiment"].__setitem__("methods", {"a": {"label": "A"}}), "experiment.methods.a.distill_weight"),
    (lambda c: c["experiment"].__setitem__("methods", {"a": {"label": "A", "distill_weight": -1}}),
     "experiment.methods.a.distill_weight"),
    (lambda c: c["experiment"].__setitem__("methods", {"a b": {"label": "A", "distill_weight": 0}}),
     "experiment.methods.a b"),
    (lambda c: c["experiment"].__setitem__("methods", {"a": {"label": "A", "distill_weight": 0.1,
                                                             "settings": {"seed": 3}}}),
     "experiment.methods.a.settings.seed"),
    (lambda c: c["experiment"].__setitem__("methods", {"a": {"label": "A", "distill_weight": 0.1,
                                                             "settings": {"eval.best_includes_step0": True}}}),
     "experiment.methods.a.settings.eval.best_includes_step0"),
    (lambda c: c["experiment"].__setitem__("methods", {"a": {"label": "A", "distill_weight": 0.1,
                                                             "settings": {"hdpo.topk_logit_k": 3}}}),
     "experiment.methods.a.settings: hdpo.topk_logit_k: unknown key"),
    (lambda c: c["experiment"].__setitem__("methods", ["grpo", "hdpo_warm_lambda0.1"]), "not a list of names"),
    (lambda c: c["benchmarks"].__setitem__("x", {"path": "x.jsonl", "answer_pattern": "(#"}),
     "benchmarks.x.answer_pattern"),
])
def test_bad_config_names_the_key(mutate, key):
    import yaml

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        from_dict(cfg)
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, value", [
    ("eval.temperature", 0),
    ("eval.temperature", -1),
    ("eval.temperature", 2.5),  # vLLM refuses temperatures above 2
    ("generation.temperature", 3),
    ("grpo.sampler_correction_cap", 0.5),
    ("grpo.sampler_correction", "tokens"),
    ("generation.vllm_cpu_kv_cache_gib", 0),
    ("eval.top_p", 0),
    ("eval.top_p", 5),
    ("optimizer.betas", [1.5, 2]),
    ("optimizer.eps", -1),
    ("hdpo.teacher_min_reward", 5),
    ("hdpo.cliff_reward_sum", -1),
    ("hdpo.cliff_reward_sum", 16),
    ("generation.gpu_memory_utilization", 7),
    ("data.max_val_problems", -3),
    ("data.max_val_problems", 0),
    ("data.max_train_problems", -5),
    ("benchmarks.math500.limit", -1),
])
def test_values_that_would_yield_meaningless_numbers_are_refused(name, value):
    """Each of these ran to the end before, writing numbers that meant nothing (pass@1 0 from empty samples,
    HDPO that never keeps a rollout, a negative slice of the validation set)."""
    cfg = load_config(REPO / "config" / "config.yaml")
    with pytest.raises(ConfigError) as err:
        from_dict(cfg.to_dict(), {name: value})
    assert str(err.value).startswith(name) and "\n" not in str(err.value)


@pytest.mark.parametrize("row, needle", [
    ({"answer": None}, "field 'answer': empty or not text (None)"),
    ({"answer": []}, "field 'answer': empty or not text"),
    ({"problem": None}, "field 'problem': empty or not text"),
])
def test_a_prepared_row_without_a_usable_problem_or_answer_names_its_row(tmp_path, row, needle):
    """A null or empty answer, or a null problem (it crashed the chat template after the model had loaded):
    one line naming the row, before any model loads."""
    import json

    data = tmp_path / "data"
    (data / "benchmarks").mkdir(parents=True)
    good = {"id": "t:0", "problem": "What is 3 + 4?", "solution": None, "answer": "7", "source": "t"}
    (data / "benchmarks" / "math500.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({**good, "id": "t:1", **row}) + "\n")
    model = tmp_path / "policy"
    model.mkdir()
    out = tmp_path / "eval" / "math500.json"
    one_line_error(*hdpo("evaluate", "--config", DEMO, "--model", str(model), "--benchmark", "math500",
                         "--data", str(data), "--out", str(out)), "math500.jsonl: row 2", needle)
    assert not out.exists()


def test_unreadable_source_files_name_the_file_and_row(tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"}\n'
                      b'{"problem": "caf\xe9", "answer": "3"}\n')
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path / "data"),
                         "--set", f"data.train=[{{path: {latin}}}]"), f"{latin}: row 3: not UTF-8 text")
    bad_csv = tmp_path / "rows.csv"
    bad_csv.write_text("problem,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,4,extra,columns\n")
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(tmp_path / "data"),
                         "--set", f"data.train=[{{path: {bad_csv}}}]"), str(bad_csv), "cannot be read as csv")


def test_outputs_that_cannot_be_written_stop_before_the_work(tmp_path, data_dir):
    """A path under a file (as a read-only folder or a full disk would): one line naming the folder, before
    the evaluation or the preflight runs, not a traceback after it with the results lost."""
    blocker = tmp_path / "afile"
    blocker.write_text("")
    model = tmp_path / "policy"
    model.mkdir()
    data = tmp_path / "data"
    (data / "benchmarks").mkdir(parents=True)
    good = '{"id": "t:0", "problem": "What is 3 + 4?", "solution": null, "answer": "7", "source": "t"}\n'
    (data / "benchmarks" / "math500.jsonl").write_text(good)
    one_line_error(*hdpo("evaluate", "--config", DEMO, "--model", str(model), "--benchmark", "math500",
                         "--data", str(data), "--out", str(blocker / "eval" / "math500.json")),
                   "evaluation output", f"{blocker} is a file, not a folder")
    one_line_error(*hdpo("preflight", "--config", DEMO, "--out", str(blocker / "verdict.json")),
                   "preflight verdict", f"{blocker} is a file")
    one_line_error(*hdpo("report", "tables", "--config", DEMO, "--results", str(tmp_path), "--out", str(blocker)),
                   "report output", f"{blocker} is a file")
    one_line_error(*hdpo("report", "figures", "--config", DEMO, "--results", str(tmp_path / "no-results"),
                         "--out", str(tmp_path / "figures")), str(tmp_path / "no-results"), "no such results folder")
    env = dict(os.environ, HDPO_DATA_DIR=str(data_dir))
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(blocker), env=env), "prepared data")


def test_an_override_that_is_not_yaml_names_itself():
    one_line_error(*hdpo("config", "--config", DEMO, "--set", "grpo.max_num_steps=["),
                   "grpo.max_num_steps=[", "not YAML")


def test_a_failed_prepare_data_leaves_the_earlier_files_whole(tmp_path, data_dir):
    """A bad benchmark source stops the step before anything is written: the folder keeps the earlier split
    and its summary, not a new train.jsonl beside an old summary."""
    env = dict(os.environ, HDPO_DATA_DIR=str(data_dir))
    out = tmp_path / "data"
    code, lines = hdpo("prepare-data", "--config", DEMO, "--out", str(out), env=env)
    assert code == 0, lines
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(*hdpo("prepare-data", "--config", DEMO, "--out", str(out), "--set", "data.split_seed=7",
                         f"benchmarks.math500.path={empty}", env=env), "no rows")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_damaged_checkpoint_stops_resume_in_one_line(tmp_path, tiny_model_dir, tiny_data):
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short by a full disk")
    one_line_error(*hdpo("train", "--config", DEMO, "--method", "grpo", "--data", str(tiny_data),
                         "--run-dir", str(tmp_path / "run"), "--work-dir", str(work), "--resume",
                         "--set", f"model.name={tiny_model_dir}", "model.gguf_file=null",
                         "experiment.require_gpu=false", "generation.backend=transformers"),
                   f"cannot resume from {work / 'checkpoint.pt'}: unreadable", "move it away")
    assert (work / "checkpoint.pt").exists()


@pytest.mark.parametrize("damage", ["no tokenizer", "truncated weights"])
def test_a_damaged_model_folder_is_named_in_one_line(tmp_path, tiny_model_dir, tiny_data, damage):
    """A policy folder without its tokenizer files (transformers would advise installing sentencepiece) or with
    a model.safetensors cut short (transformers: "incomplete metadata", no file named)."""
    import shutil

    from hdpo.io import write_jsonl

    model = tmp_path / "policy_final"
    shutil.copytree(tiny_model_dir, model)
    if damage == "no tokenizer":
        for f in model.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
                f.unlink()
        needles = (str(model), "no tokenizer files", "copy them from the model")
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        needles = (str(weights), "bytes but the file has", "rerun the job that wrote it")
    data = tmp_path / "data"
    write_jsonl(data / "benchmarks" / "math500.jsonl", [{"id": "t:0", "problem": "1 + 1?", "answer": "2",
                                                         "source": "t"}])
    one_line_error(*hdpo("evaluate", "--config", DEMO, "--model", str(model), "--benchmark", "math500",
                         "--data", str(data), "--out", str(tmp_path / "out.json"),
                         "--set", "experiment.require_gpu=false"), *needles)
    one_line_error(*hdpo("train", "--config", DEMO, "--method", "grpo", "--data", str(tiny_data),
                         "--run-dir", str(tmp_path / "run"), "--work-dir", str(tmp_path / "work"),
                         "--set", f"model.name={model}", "model.gguf_file=null", "experiment.require_gpu=false"),
                   *needles)


def test_evaluation_refuses_a_policy_trained_under_other_settings(tmp_path, tiny_model_dir, tiny_data):
    """A policy records the digest of the settings that made it (hdpo_meta.json); `hdpo evaluate --method`
    under a config whose run of that method differs refuses it in one line naming the override, evaluates it
    with the override, and evaluates it plainly under its own settings."""
    from conftest import tiny_config
    from hdpo.config import run_config, save_config
    from hdpo.train import train

    cfg = tiny_config(tiny_model_dir, **{"grpo.max_num_steps": 1, "eval.val_period": 1})
    save_config(cfg, tmp_path / "config.yaml")
    run = tmp_path / "runs" / "grpo_seed1"
    train(run_config(cfg, "grpo", 1), tiny_data, run, tmp_path / "work", tmp_path / "models", resume=False)
    policy = run / "policy_final"
    args = ("evaluate", "--config", str(tmp_path / "config.yaml"), "--method", "grpo", "--model", str(policy),
            "--benchmark", "toy", "--data", str(tiny_data), "--out", str(tmp_path / "eval" / "toy.json"))
    one_line_error(*hdpo(*args, "--set", "optimizer.lr=0.5"), str(policy), "trained under other settings",
                   "eval.check_policy_config=false")
    assert not (tmp_path / "eval" / "toy.json").exists()
    assert hdpo(*args, "--set", "optimizer.lr=0.5", "eval.check_policy_config=false")[0] == 0
    code, lines = hdpo(*args, "--set", "eval.num_samples=3")
    assert code == 0, lines  # evaluation settings are not training's
