"""Benchmarks and training sets declared in config: field names, answer lists and patterns, prompt template and
system prompt are keys; the built-in formats are presets of the same keys. A benchmark with its own layout goes
through prepare-data and evaluation with no code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hdpo.config import SYSTEM_PROMPT, DatasetSpec, from_dict
from hdpo.data import PRESETS, build_messages, load_problems, mapping_of, read_problems
from hdpo.reward import score_one

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "demo.yaml"


def _rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_other_field_names_and_a_list_of_accepted_answers(tmp_path):
    path = _rows(tmp_path / "b.jsonl", [{"question": "What is 3^3?", "answer": ["27.0", "27"], "uid": "q1"},
                                       {"question": "What is 2+2?", "answer": ["4"], "uid": "q2"}])
    with pytest.raises(Exception, match="field 'problem': missing"):  # the generic default names the field
        load_problems(DatasetSpec(path=path))
    probs = load_problems(DatasetSpec(path=path, problem_key="question", id_key="uid"), name="mine")
    assert [p.id for p in probs] == ["mine:q1", "mine:q2"] and probs[0].source == "mine"
    assert probs[0].problem == "What is 3^3?" and probs[0].answer == ["27.0", "27"] and probs[1].answer == "4"
    assert score_one("so \\boxed{27}", probs[0].answer)[0] == 1.0
    assert score_one("so \\boxed{28}", probs[0].answer)[0] == 0.0
    assert score_one("\\boxed{4}", probs[1].answer)[0] == 1.0


def test_pattern_removal_solution_prompt_and_system_prompt(tmp_path):
    path = _rows(tmp_path / "g.jsonl", [{"q": "How many?", "sol": "3 + 4 = <<3+4=7>>7 apples, times 1000\n#### 7,000"},
                                       {"q": "And now?", "sol": "no final answer"}])
    spec = DatasetSpec(path=path, problem_key="q", answer_key="sol", answer_pattern=r"####\s*(.+?)\s*$",
                       answer_remove=",", solution_key="sol", solution_remove=r"<<[^<>]*>>", limit=1,
                       prompt_template="Solve this: {problem} (answer in \\boxed{})", system_prompt="Be brief.")
    p = load_problems(spec)[0]
    assert p.answer == "7000" and p.solution == "3 + 4 = 7 apples, times 1000"
    assert p.problem == "Solve this: How many? (answer in \\boxed{})"
    assert build_messages(p, SYSTEM_PROMPT)[0] == {"role": "system", "content": "Be brief."}
    assert build_messages(p, SYSTEM_PROMPT, "solution")[1]["content"].startswith(p.problem)
    with pytest.raises(Exception, match=r"g\.jsonl: row 2: field 'sol': no match of answer_pattern"):
        load_problems(DatasetSpec(**{**spec.__dict__, "limit": None}))


def test_templates_build_problem_and_solution_from_several_fields(tmp_path):
    path = _rows(tmp_path / "s.jsonl", [{"B": " Tom has 3. ", "Q": "How many? ", "Eq": "( 1 + 2 )", "A": 3.0},
                                       {"B": "x", "Q": "y", "Eq": "", "A": 2.5}])
    spec = DatasetSpec(path=path, problem_template="{B} {Q}", answer_key="A", solution_template="{Eq} = {A}")
    a, b = load_problems(spec)
    assert (a.problem, a.solution, a.answer) == ("Tom has 3. How many?", "( 1 + 2 ) = 3", "3")
    assert (b.solution, b.answer) == (None, "2.5")  # an empty field: no solution, not " = 2.5"


def test_a_key_wins_over_its_preset(tmp_path):
    path = _rows(tmp_path / "m.jsonl", [{"question": "p?", "answer": "5", "unique_id": "u"}])
    assert load_problems(DatasetSpec(format="math500", path=path, problem_key="question"))[0].id == "math500:u"
    assert mapping_of(DatasetSpec(format="gsm8k", answer_remove=" "))["answer_remove"].pattern == " "
    assert set(PRESETS) == {"openmathinstruct2", "math500", "aime", "gsm8k", "svamp", "asdiv", "mawps"}


def test_config_checks_the_mapping_keys():
    from hdpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"^benchmarks\.b\.answer_pattern: '\(' is not a regular expression"):
        from_dict({"benchmarks": {"b": {"path": "x.jsonl", "answer_pattern": "("}}, "experiment": {"benchmarks": ["b"]}})
    with pytest.raises(ConfigError, match=r"^data\.train\[0\]\.format 'gsm9k': unknown"):
        from_dict({"data": {"train": [{"format": "gsm9k"}]}})


def test_new_benchmark_through_config_alone_cli(tmp_path, data_dir, tiny_model_dir):
    """prepare-data and evaluate, the real CLI: a benchmark the tests write with its own field names, declared
    only in a config file layered over the demo. The tiny model answers 7 on plain prompts: the problem whose
    accepted answers include 7 scores 1, the one that accepts only 8 scores 0."""
    toy = "Toy problem number {}: what is the magic number?"
    bench = _rows(tmp_path / "magic.jsonl", [{"question": toy.format(0), "answer": ["8", "7.0"]},
                                            {"question": toy.format(1), "answer": [8]}])
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["benchmarks"]["magic"] = {"path": bench, "problem_key": "question"}
    cfg["experiment"]["benchmarks"] = ["magic"]
    cfg["model"] = {"name": str(tiny_model_dir), "gguf_file": None, "gguf_package": None}
    cfg["generation"].update({"max_new_tokens": 12, "backend": "transformers"})  # the engine is not the test
    cfg["eval"].update({"num_samples": 2, "pass_k": [1, 2], "reward_workers": 0, "greedy": True})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    env = dict(os.environ, PYTHONPATH=str(REPO), HDPO_DATA_DIR=str(data_dir))
    run = lambda *a: subprocess.run([sys.executable, "-m", "hdpo", *a, "--config", str(path)], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=300)
    proc = run("prepare-data", "--out", str(tmp_path / "data"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    probs = read_problems(tmp_path / "data" / "benchmarks" / "magic.jsonl")
    assert [p.answer for p in probs] == [["8", "7.0"], "8"] and probs[0].id == "magic:0"
    proc = run("evaluate", "--model", str(tiny_model_dir), "--benchmark", "magic", "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "magic.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "magic.json").read_text())
    assert result["num_problems"] == 2 and result["greedy_acc"] == 0.5
