"""What the Snakemake workflow computes from the config (hdpo/workflow.py, hdpo/layout.py), without Snakemake:
config layers, the grid and its files, rerun settings, resources, and the GPUs of one machine."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from hdpo import layout
from hdpo import workflow as plan
from hdpo.config import from_dict, paper_methods


def test_command_line_values_arrive_typed_and_dotted_keys_nested():
    given = {"grpo": {"max_num_steps": 3, "micro_batch_size": 4}, "eval.num_samples": 2}
    merged = plan.merge_command_line(given, ["grpo={max_num_steps: 5}", "seed=7", "hdpo.teacher=frozen"])
    assert merged == {"grpo": {"max_num_steps": 5, "micro_batch_size": 4}, "eval": {"num_samples": 2}, "seed": 7,
                      "hdpo": {"teacher": "frozen"}}
    assert given["grpo"]["max_num_steps"] == 3  # Snakemake's config is not changed in place


def test_layers_name_the_default_file_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layers = plan.config_layers(["mine.yaml", str(tmp_path / "config.yaml")], ["mine.yaml"], ["seed=1"])
    assert layers == "config.yaml + mine.yaml + --config seed=1"


def test_the_merged_config_is_named_by_its_content(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = plan.write_merged_config(from_dict({"seed": 1}))
    assert re.fullmatch(r"results/config/[0-9a-f]{12}\.yaml", path)
    assert plan.write_merged_config(from_dict({"seed": 1})) == path
    assert plan.write_merged_config(from_dict({"seed": 2})) != path
    assert from_dict(yaml.safe_load(Path(path).read_text())).seed == 1


def test_run_names_and_paths():
    assert layout.run_name("grpo", 42) == "grpo_seed42"
    assert layout.run_dir(layout.RUN) == "results/runs/{method}_seed{seed}"
    assert layout.run_files("grpo_seed42")[0] == "results/runs/grpo_seed42/metrics.jsonl"
    result = layout.eval_result("r", "best", "aime24")
    assert layout.eval_samples(result) == "results/eval/r/best/aime24.samples.jsonl.gz"
    assert layout.eval_samples(layout.base_eval_result("math500")) == "results/eval/base/math500.samples.jsonl.gz"


def _config(**experiment):
    return from_dict({"experiment": {"seeds": [1, 2], "benchmarks": ["math500"], **experiment}})


def test_the_grid_lists_every_run_and_its_files():
    grid = plan.Grid(_config(checkpoints=["final", "best"]))
    assert grid.runs(["grpo"]) == ["grpo_seed1", "grpo_seed2"]
    assert grid.method_of("hdpo_frozen_lambda0.1_seed2") == "hdpo_frozen_lambda0.1"
    assert grid.eval_files("grpo_seed1") == ["results/eval/grpo_seed1/final/math500.json",
                                             "results/eval/grpo_seed1/best/math500.json"]
    assert len(grid.targets()) == 5 * 2 * (4 + 2)
    inputs = grid.report_inputs()
    assert len(inputs) == len(grid.targets()) + 5 * 2 * 2 + 2 and inputs[-1].startswith("results/eval/base/")
    assert grid.reused_eval("grpo_seed1", "best", "math500") == ["results/eval/grpo_seed1/final/math500.json"]
    assert grid.reused_eval("grpo_seed1", "final", "math500") == []
    assert plan.Grid(_config(checkpoints=["best"])).reused_eval("grpo_seed1", "best", "math500") == []


def test_wildcards_match_only_the_grid():
    patterns = plan.Grid(_config()).wildcard_constraints()
    run = re.compile(patterns["run"])
    assert run.fullmatch("hdpo_frozen_lambda0.1_seed2") and not run.fullmatch("hdpo_frozen_lambda0x1_seed2")
    assert not run.fullmatch("grpo_seed3")
    assert patterns["ckpt"] == "final|best"
    assert plan.Grid(_config(checkpoints=[])).wildcard_constraints()["ckpt"] == "(?!)"  # matches nothing


def test_groups_of_methods():
    methods = {**paper_methods("grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.1", "hdpo_drifting_lambda0.01"),
               "ets": {"label": "ETS", "distill_weight": 0.1, "settings": {"hdpo.reinject_cliffs_after_steps": 1}}}
    grid = plan.Grid(_config(methods=methods))
    assert grid.lambda_sweep() == ["grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.1",
                                   "hdpo_drifting_lambda0.01"]
    assert grid.teacher_ablation() == ["grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.1"]


RAW = {"grpo": {"max_num_steps": 5, "micro_batch_size": 4}, "optimizer": {"lr": 2.0e-6},
       "experiment": {"seeds": [1]}}


def _settings(raw: dict) -> plan.Settings:
    return plan.Settings(from_dict(raw), raw)


def test_settings_hold_what_changes_a_result_and_nothing_else():
    settings = _settings(RAW)
    assert settings.train("grpo") == ('{"grpo":{"max_num_steps":5},"hdpo":{"distill_weight":0},'
                                      '"optimizer":{"lr":2e-06}}')  # runtime-only micro_batch_size left out
    assert '"teacher":"frozen"' in settings.train("hdpo_frozen_lambda0.1")
    assert "label" not in settings.train("hdpo_frozen_lambda0.1")
    assert settings.evaluate("grpo", "aime24") == '{"benchmark":null,"system_prompt":null}'
    assert settings.base_evaluate("aime24") == '{"eval":{"benchmark":null,"system_prompt":null},"seed":42}'
    eval_raw = {**RAW, "eval": {"val_period": 3, "num_samples": 8}}
    assert _settings(eval_raw).evaluate("grpo", "aime24") == (
        '{"benchmark":null,"eval":{"num_samples":8},"system_prompt":null}')  # val_period is training's


def test_settings_digests_are_stable():
    """The checkpoint folders are named by these digests, and the same JSON decides reruns: a change here reruns
    every finished job of every user."""
    settings = _settings(RAW)
    assert settings.work_dir("grpo", "1") == "results/checkpoints/grpo_seed1/92b405f0462a"
    assert settings.work_dir("hdpo_frozen_lambda0.1", "1") == (
        "results/checkpoints/hdpo_frozen_lambda0.1_seed1/21f9350ed6f1")
    faster = _settings({**RAW, "grpo": {**RAW["grpo"], "micro_batch_size": 1}})  # runtime-only: the same run
    assert faster.work_dir("grpo", "1") == settings.work_dir("grpo", "1")
    moved = [_settings({**RAW, "checkpoint": {"dir": d}}).work_dir("grpo", "1") for d in ("a", "b")]
    assert moved[0].startswith("a/grpo_seed1/") and moved[0][1:] == moved[1][1:]
    assert _settings({**RAW, "optimizer": {"lr": 1.0e-6}}).work_dir("grpo", "1") != settings.work_dir("grpo", "1")


def test_resources_per_rule():
    raw = {"resources": {"train": {"gpu": 8, "mem_mb": 1000}, "evaluate": {"threads": 2}}}
    assert plan.rule_resource(raw, "train", "mem_mb") == 1000
    assert plan.rule_resource(raw, "train", "runtime") == 600  # the workflow's default for training
    assert [plan.gpu_job_token(raw, r) for r in ("train", "evaluate")] == [1, 0]
    assert plan.most_gpus(raw) == 8 and plan.most_gpus({}) == 0


def test_job_commands():
    python = plan.python_command(Path("/repo dir"), in_conda=True)
    assert python == "PYTHONPATH='/repo dir'${PYTHONPATH:+:$PYTHONPATH} python"
    assert plan.train_launcher("py", 1) == "py -m hdpo"
    assert plan.train_launcher("py", 4) == "py -m torch.distributed.run --standalone --nproc_per_node=4 -m hdpo"
    assert plan.reuse_option(["a b.json"]) == "--reuse 'a b.json'" and plan.reuse_option([]) == ""
    assert plan.report_code(Path("/elsewhere"), "tables")[-1] == "/elsewhere/hdpo/ledger.py"


@pytest.mark.parametrize("visible, gpus", [("0,1,NoDevFiles,3", 2), ("GPU-8a7e,MIG-19f2", 2), ("-1", 0), ("", 0)])
def test_visible_gpus_from_cuda_visible_devices(monkeypatch, visible, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert plan.visible_gpus() == (gpus, f"CUDA_VISIBLE_DEVICES={visible}")


@pytest.mark.parametrize("listing, found", [
    ("GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n", (2, "nvidia-smi -L")),
    ("GPU 0: NVIDIA A100 (UUID: GPU-1)\n  MIG 3g.40gb Device 0: (UUID: MIG-1)\n",
     (1, "nvidia-smi -L (MIG: one device per process)")),
])
def test_visible_gpus_from_nvidia_smi(monkeypatch, listing, found):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(plan.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, listing, ""))
    assert plan.visible_gpus() == found


def test_no_nvidia_smi_counts_no_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(plan.subprocess, "run", missing)
    assert plan.visible_gpus() == (0, "no nvidia-smi")


def test_gpu_limits_of_one_machine():
    def four():
        return 4, "here"

    assert plan.local_gpu_limits(None, None, four) == ({"gpu": 4, "gpu_jobs": 1}, "here")
    assert plan.local_gpu_limits(2, None, four) == ({"gpu_jobs": 1}, None)  # a given limit wins, uncounted
    assert plan.local_gpu_limits(2, 3, four) == ({}, None)
    assert plan.local_gpu_limits(None, None, lambda: (0, "none seen")) == ({}, "none seen")
    message = plan.no_gpu_limit_message("a.yaml", 8, True, "none seen")
    assert "up to 8" in message and "no GPU is visible here (none seen)" in message and "--resources gpu=" in message
    assert "--jobs was given" in plan.no_gpu_limit_message("a.yaml", 8, False, None)
