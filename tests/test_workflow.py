"""The Snakemake workflow: lint, config schema, the paper's job grid, targets, resources, and which jobs rerun
on which change, after a real end-to-end run of the DAG on a tiny model.

Every Snakemake call runs in a temporary working directory (`--directory`), so results/ of the checkout never
changes what a dry-run lists.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from hdpo import config as hdpo_config
from hdpo.config import paper_methods

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
PAPER_CONFIG = REPO / "config" / "config.yaml"
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake")] if (BIN / "snakemake").exists() else [sys.executable, "-m", "snakemake"]
PAPER_METHODS = ["grpo", "hdpo_frozen_lambda0.01", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.01",
                 "hdpo_drifting_lambda0.1"]


def snakemake(workdir: Path, *args: str, snakefile: Path = SNAKEFILE, check: bool = True) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # jobs run `python`
    args = list(args)
    if "--configfile" in args:  # it takes several values: keep it (and its .yaml files) last, after the targets
        i = args.index("--configfile")
        j = i + 1
        while j < len(args) and args[j].endswith(".yaml"):
            j += 1
        args = args[:i] + args[j:] + args[i:j]
    proc = subprocess.run([*SNAKEMAKE, "-s", str(snakefile), "--directory", str(workdir), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}")
    return out if check else (proc.returncode, out)


@pytest.fixture(autouse=True)
def _no_gpu_visible(monkeypatch):
    """The workflow counts this machine's GPUs when no limit is given: every test here sees none, wherever it
    runs, unless it says otherwise."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def job_counts(out: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run: rule -> number of jobs ({} when nothing is to be done)."""
    counts, in_table = {}, False
    for line in out.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            m = re.match(r"^(\S+)\s+(\d+)\s*$", line)
            if m and m.group(1) != "total":
                counts[m.group(1)] = int(m.group(2))
            elif line.startswith("total"):
                break
    return counts


def dry_run(workdir: Path, configfile: Path, *targets: str, extra: tuple = ()) -> dict[str, int]:
    return job_counts(snakemake(workdir, "-n", "--cores", "4", "--configfile", str(configfile), *extra, *targets))


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def paper_config() -> dict:
    return yaml.safe_load(PAPER_CONFIG.read_text())


# --- lint and schema ----------------------------------------------------------------------------------------------

def test_lint_is_clean(tmp_path):
    code, out = snakemake(tmp_path, "--lint", "--configfile", str(PAPER_CONFIG), check=False)
    assert code == 0 and "Congratulations" in out, out


def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def test_schema_accepts_the_paper_config():
    jsonschema.validate(paper_config(), _schema())


@pytest.mark.parametrize("mutate, where", [
    (lambda c: c["grpo"].__setitem__("num_prompt_per_step", 32), "num_prompt_per_step"),  # typo
    (lambda c: c.__setitem__("optimiser", {"lr": 1e-6}), "optimiser"),  # unknown section
    (lambda c: c["grpo"].__setitem__("max_num_steps", "many"), "many"),  # bad type
    (lambda c: c["experiment"]["methods"].__setitem__("warm", {"label": "w", "teacher": "warm",
                                                               "distill_weight": 0.1}), "warm"),
    (lambda c: c["resources"]["train"].__setitem__("gpus", 8), "gpus"),
])
def test_schema_rejects_bad_configs(mutate, where):
    cfg = paper_config()
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError) as err:
        jsonschema.validate(cfg, _schema())
    assert where in str(err.value.message) or where in str(list(err.value.path))


def test_schema_file_is_generated_from_the_typed_config():
    """One source of truth: the committed schema is what the typed config generates (regenerate with
    `python -m hdpo config --schema > workflow/schemas/config.schema.yaml`), and every key has a doc."""
    assert _schema() == hdpo_config.json_schema()
    keys = list(hdpo_config.iter_keys())
    assert len(keys) > 80 and all(k.doc for k in keys), [k.key for k in keys if not k.doc]
    assert {"grpo.max_num_steps", "experiment.methods.<name>.distill_weight", "data.train[].answer_key"} <= {
        k.key for k in keys}


def test_a_new_key_flows_into_schema_and_explain():
    """Adding a key is one `key(...)` line in a dataclass: schema and key listing walk the dataclasses, so it
    reaches both with no other edit (here a new section, built the way hdpo/config.py declares them)."""
    from dataclasses import make_dataclass

    section = make_dataclass("NewSection", [("new_budget", int, hdpo_config.key(7, "a brand-new knob", paper=True))])
    top = make_dataclass("Top", [("grpo", section, hdpo_config.key(doc="a section", factory=section))])
    defs: dict = {}
    hdpo_config._defs(top, defs)
    assert defs["NewSection"]["properties"]["new_budget"] == {"type": "integer", "description": "a brand-new knob"}
    assert [(k.key, k.type, k.default, k.doc, k.paper) for k in hdpo_config.iter_keys(top)] == [
        ("grpo.new_budget", "int", 7, "a brand-new knob", True)]


def test_paper_config_loads_in_the_typed_config():
    hdpo_config.load_config(PAPER_CONFIG)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["grpo"].__setitem__("num_prompt_per_step", 32), "num_prompt_per_step"),
    (lambda c: c["eval"].__setitem__("num_samples", "eight"), "eight"),
    (lambda c: c["eval"].__setitem__("pass_k", [1, 4, 16]), "eval.pass_k"),  # value check of hdpo.config
])
def test_bad_config_stops_snakemake_before_any_job(tmp_path, mutate, message):
    cfg = paper_config()
    mutate(cfg)
    path = write_config(tmp_path / "bad.yaml", cfg)
    code, out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(path), check=False)
    assert code != 0
    assert message in out
    assert "Job stats" not in out


def _merged_config_of(workdir: Path, out: str, rule: str = "train") -> dict:
    """The config file a job reads, from a dry-run's printed shell command (relative to the working directory)."""
    paths = set(re.findall(rf"-m hdpo {rule} --config (\S+)", out))
    assert len(paths) == 1, out[-3000:]
    return yaml.safe_load((workdir / paths.pop()).read_text())


def test_partial_override_file_keeps_the_papers_setup(tmp_path):
    """A two-line --configfile changes what it sets; the paper's GPUs, torchrun and the rest stay."""
    part = tmp_path / "part.yaml"
    part.write_text("grpo:\n  max_num_steps: 5\n")
    out = snakemake(tmp_path, "-n", "-p", "--cores", "4", "--configfile", str(part))
    blocks = _job_blocks(out, "train")
    assert len(blocks) == 6 and all(re.search(r"resources: .*\bgpu=8\b", b) for b in blocks)
    assert out.count("--nproc_per_node=8 -m hdpo train") == 6
    merged = _merged_config_of(tmp_path, out)
    assert merged["grpo"]["max_num_steps"] == 5 and merged["grpo"]["num_prompts_per_step"] == 32
    assert merged["model"]["name"] == "Qwen/Qwen2.5-Math-1.5B-Instruct" and merged["resources"]["train"]["gpu"] == 8


def test_config_values_on_the_command_line_reach_the_jobs(tmp_path):
    out = snakemake(tmp_path, "grpo", "-n", "-p", "--cores", "4", "--configfile", str(PAPER_CONFIG), "--config",
                    "grpo={max_num_steps: 5}", "optimizer={lr: 2.0e-6}", "seed=3")
    merged = _merged_config_of(tmp_path, out)
    assert merged["grpo"]["max_num_steps"] == 5 and merged["grpo"]["num_generations_per_prompt"] == 16
    assert merged["optimizer"]["lr"] == 2.0e-6 and merged["seed"] == 3
    assert _merged_config_of(tmp_path, out, "evaluate") == merged  # every job reads the same file
    from hdpo.config import run_config

    run = run_config(merged, "grpo", 42)  # what `hdpo train --config <file> --method grpo --seed 42` builds
    assert run.grpo.max_num_steps == 5 and run.run.method == "grpo" and run.run.label == "GRPO baseline"
    # two override files layer in order, later wins; and a changed value reruns training
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("grpo: {max_num_steps: 7}\noptimizer: {lr: 3.0e-6}\n")
    b.write_text("grpo: {max_num_steps: 9}\n")
    out = snakemake(tmp_path, "-n", "-p", "--cores", "4", "grpo", "--configfile", str(a), str(b))
    merged = _merged_config_of(tmp_path, out)
    assert merged["grpo"]["max_num_steps"] == 9 and merged["optimizer"]["lr"] == 3.0e-6


def test_bad_override_stops_in_one_line(tmp_path):
    code, out = snakemake(tmp_path, "-n", "--cores", "1", "--config", "grpo={max_num_step: 5}", check=False)
    assert code != 0 and "grpo.max_num_step: unknown key" in out and "--config grpo={max_num_step: 5}" in out
    assert "Traceback" not in out and "Failed validating" not in out


# --- the grid ---------------------------------------------------------------------------------------------------

def test_paper_grid(tmp_path):
    counts = dry_run(tmp_path, PAPER_CONFIG)
    # the paper's five methods and expand-then-sharpen
    assert counts == {"prepare_data": 1, "prepare_benchmark": 3, "train": 6, "evaluate": 6 * 3 * 2, "evaluate_base": 3,
                      "tables": 1,
                      "figures": 1, "all": 1}


def test_two_seed_demo_grid(tmp_path):
    """config/demo_seeds.yaml: GRPO and one HDPO method, two seeds each, the untrained model once per benchmark
    (the demo's one: MATH-500)."""
    counts = dry_run(tmp_path, REPO / "config" / "demo.yaml", extra=(str(REPO / "config" / "demo_seeds.yaml"),))
    assert counts == {"prepare_data": 1, "prepare_benchmark": 1, "train": 4, "evaluate": 4 * 2 * 1, "evaluate_base": 1,
                      "tables": 1,
                      "figures": 1, "all": 1}


def test_method_targets_build_only_that_method(tmp_path):
    counts = dry_run(tmp_path, PAPER_CONFIG, "hdpo_drifting_lambda0.1")
    assert counts == {"prepare_data": 1, "prepare_benchmark": 3, "train": 1, "evaluate": 3 * 2,
                      "hdpo_drifting_lambda0.1": 1}
    out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(PAPER_CONFIG), "grpo")
    assert "wildcards: method=grpo, seed=42" in out
    assert "method=hdpo" not in out


def test_group_targets(tmp_path):
    assert dry_run(tmp_path, PAPER_CONFIG, "lambda_sweep")["train"] == 5
    cfg = paper_config()
    keep = ("grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.1")
    cfg["experiment"]["methods"] = {m: r for m, r in cfg["experiment"]["methods"].items() if m in keep}
    cfg["experiment"]["methods"]["drift_half"] = {"label": "HDPO drifting, λ=0.5", "distill_weight": 0.5}
    cfg["experiment"]["methods"]["frozen_topk8"] = {"label": "top-8", "teacher": "frozen", "distill_weight": 0.5,
                                                   "settings": {"hdpo.topk_logits_k": 8}}
    path = write_config(tmp_path / "c.yaml", cfg)
    # the file is layered over config/config.yaml: `null` drops the paper's records it does not keep
    cfg["experiment"]["methods"].update({m: None for m in PAPER_METHODS if m not in keep})
    write_config(path, cfg)
    out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(path), "teacher_ablation")
    trained = set(re.findall(r"wildcards: method=(\S+), seed=", out))
    # 0.5 has no plain frozen pair (frozen_topk8 differs in more than the teacher)
    assert trained == {"grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.1"}
    out = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(path), "lambda_sweep")
    assert set(re.findall(r"wildcards: method=(\S+), seed=", out)) == {*keep, "drift_half"}


def test_every_rule_and_target_is_listed(tmp_path):
    out = snakemake(tmp_path, "--list-rules", "--configfile", str(PAPER_CONFIG))
    rules = set(out.split())
    assert {"all", "prepare_data", "prepare_benchmark", "train", "evaluate", "evaluate_base", "tables", "figures", "lambda_sweep",
            "teacher_ablation", *PAPER_METHODS} <= rules


def test_more_seeds_benchmarks_and_methods_add_jobs(tmp_path):
    cfg = paper_config()
    cfg["experiment"]["seeds"] = [42, 43]
    counts = dry_run(tmp_path, write_config(tmp_path / "seeds.yaml", cfg))
    assert counts["train"] == 12 and counts["evaluate"] == 72  # six methods (five + expand-then-sharpen)
    cfg["experiment"]["methods"]["hdpo_frozen_lambda0.5"] = {"label": "HDPO frozen, λ=0.5", "teacher": "frozen",
                                                             "distill_weight": 0.5}
    cfg["experiment"]["benchmarks"] = ["math500"]
    counts = dry_run(tmp_path, write_config(tmp_path / "more.yaml", cfg))
    assert counts["train"] == 14 and counts["evaluate"] == 7 * 2 * 1 * 2
    assert "rule hdpo_frozen_lambda0.5" in snakemake(
        tmp_path, "-n", "--cores", "1", "--configfile", str(tmp_path / "more.yaml"), "hdpo_frozen_lambda0.5")


def _job_blocks(out: str, rule: str) -> list[str]:
    return re.findall(rf"^(?:local)?rule {re.escape(rule)}:\n(.*?)(?=^\S|\Z)", out, flags=re.M | re.S)


def test_train_jobs_ask_for_8_gpus_under_torchrun(tmp_path):
    out = snakemake(tmp_path, "-n", "-p", "--cores", "4", "--configfile", str(PAPER_CONFIG))
    blocks = _job_blocks(out, "train")
    assert len(blocks) == 6
    for block in blocks:
        assert re.search(r"resources: .*\bgpu=8\b", block), block
    assert out.count("-m torch.distributed.run --standalone --nproc_per_node=8 -m hdpo train") == 6
    for block in _job_blocks(out, "evaluate"):
        assert re.search(r"resources: .*\bgpu=1\b", block), block
    # a smaller machine scales the job down (and the launcher with it)
    out = snakemake(tmp_path, "grpo", "-n", "-p", "--cores", "4", "--resources", "gpu=1",
                    "--configfile", str(PAPER_CONFIG))
    assert re.search(r"Shell command: .*python\S* -m hdpo train", out) and "torch.distributed.run" not in out


def test_cpu_config_trains_without_torchrun(tmp_path):
    cfg = paper_config()
    cfg["resources"]["train"]["gpu"] = 0
    out = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--configfile",
                    str(write_config(tmp_path / "cpu.yaml", cfg)), "grpo")
    assert " -m hdpo train --config" in out and "torchrun" not in out


def test_local_profile(tmp_path):
    out = snakemake(tmp_path, "-n", "--profile", str(REPO / "workflow" / "profiles" / "local"),
                    "--configfile", str(PAPER_CONFIG))
    assert job_counts(out)["train"] == 6
    # one GPU job at a time, the untrained model's evaluations too: the local executor gives no job GPU ids
    blocks = _job_blocks(out, "train") + _job_blocks(out, "evaluate") + _job_blocks(out, "evaluate_base")
    assert len(blocks) == 6 + 36 + 3
    for block in blocks:
        assert re.search(r"\bgpu_jobs=1\b", block), block
    assert "gpu_jobs=1" in (REPO / "workflow" / "profiles" / "local" / "config.yaml").read_text()


def test_gpu_jobs_without_a_gpu_limit_or_a_visible_gpu_stop_before_running(tmp_path):
    """GPU jobs on one machine with no `gpu` limit and no GPU visible: stop before any job, naming the fixes."""
    code, out = snakemake(tmp_path, "--cores", "1", "--configfile", str(PAPER_CONFIG), "prepare_data", check=False)
    assert code != 0 and "--resources gpu=" in out and "config/demo.yaml" in out
    assert not (tmp_path / "results" / "logs" / "prepare_data.log").exists()


def test_without_a_gpu_limit_the_visible_gpus_are_the_limit(tmp_path, monkeypatch):
    """`snakemake --cores all` on a GPU node: the GPUs visible there become the limit (a train job asking for 8
    starts 2 torchrun processes on 2 GPUs) and every evaluation takes the one-at-a-time token; a limit given
    on the command line wins."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    out = snakemake(tmp_path, "-n", "-p", "--cores", "4", "--configfile", str(PAPER_CONFIG))
    assert "using the 2 GPU(s) visible here" in out
    assert len(re.findall(r"torch.distributed.run --standalone --nproc_per_node=2 -m hdpo train", out)) == 6
    blocks = _job_blocks(out, "train") + _job_blocks(out, "evaluate") + _job_blocks(out, "evaluate_base")
    assert len(blocks) == 6 + 36 + 3 and all(re.search(r"\bgpu_jobs=1\b", b) for b in blocks)
    assert not any("gpu_jobs=1" in b for b in _job_blocks(out, "prepare_data") + _job_blocks(out, "tables"))
    out = snakemake(tmp_path, "grpo", "-n", "-p", "--cores", "4", "--resources", "gpu=4",
                    "--configfile", str(PAPER_CONFIG))
    assert "visible here" not in out and "--nproc_per_node=4 -m hdpo train" in out
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # CUDA's way of hiding every GPU
    code, out = snakemake(tmp_path, "--cores", "1", "--configfile", str(PAPER_CONFIG), "prepare_data", check=False)
    assert code != 0 and "--resources gpu=" in out


@pytest.mark.parametrize("visible, smi, gpus", [
    ("0,1,NoDevFiles,3", None, 2),  # CUDA stops at the first entry that is no index or UUID (SLURM's filler)
    ("GPU-8a7e,GPU-19f2,GPU-44c0", None, 3),
    (None, "GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n", 2),
    (None, "GPU 0: NVIDIA A100 (UUID: GPU-1)\n  MIG 3g.40gb Device 0: (UUID: MIG-1)\n"
           "GPU 1: NVIDIA A100 (UUID: GPU-2)\n  MIG 3g.40gb Device 0: (UUID: MIG-2)\n", 1),  # a process sees one MIG
])
def test_visible_gpus_are_counted_as_cuda_counts_them(tmp_path, monkeypatch, visible, smi, gpus):
    """CUDA_VISIBLE_DEVICES where set, else `nvidia-smi -L` (a stand-in here: this machine has none)."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\nprintf '%s' '{smi}'\n")
        (fake / "nvidia-smi").chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    out = snakemake(tmp_path, "grpo", "-n", "-p", "--cores", "4", "--configfile", str(PAPER_CONFIG))
    assert f"using the {gpus} GPU(s) visible here" in out
    launch = f"torch.distributed.run --standalone --nproc_per_node={gpus} -m hdpo" if gpus > 1 else "python -m hdpo"
    assert re.search(rf"{re.escape(launch)} train", out)


def test_jobs_option_leaves_the_gpus_uncounted_and_says_so(tmp_path, monkeypatch):
    """With --jobs Snakemake counts cluster nodes: the workflow sets no limit and the stop names why."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    code, out = snakemake(tmp_path, "--cores", "1", "--jobs", "2", "--configfile", str(PAPER_CONFIG), "prepare_data",
                          check=False)
    assert code != 0 and "--jobs was given" in out and "visible here" not in out


def test_the_limits_found_here_are_the_runs(tiny_repo, monkeypatch):
    """A real run (the data step) of a config whose evaluations ask for a GPU, on a machine that shows 3:
    Snakemake runs with gpu=3 and one GPU job at a time."""
    cfg = _tiny()
    cfg["resources"]["evaluate"]["gpu"] = 1
    write_config(tiny_repo / "config" / "gpu.yaml", cfg)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    out = snakemake(tiny_repo, "prepare_data", "--cores", "1", "--configfile", str(tiny_repo / "config" / "gpu.yaml"),
                    snakefile=tiny_repo / "workflow" / "Snakefile")
    provided = re.search(r"Provided resources: (.*)", out)
    assert provided, out
    for name, value in (("gpu", 3), ("gpu_jobs", 1)):  # Snakemake 9 prints gpu=Resource("gpu", 3), 8 gpu=3
        assert re.search(rf'\b{name}=(?:Resource\("{name}", )?{value}\b', provided.group(1)), provided.group(0)


# --- the DAG end to end on a tiny real model, then which jobs rerun on which change ---------------------------

def _tiny(**experiment) -> dict:
    """The real pipeline, sized for seconds: a tiny in-memory-built model, 2 steps, SVAMP and MATH-500 slices."""
    return {
        "seed": 1,
        "model": {"name": os.environ["HDPO_TINY_MODEL"], "dtype": "float32", "max_total_sequence_length": 1024},
        "data": {"train": [{"format": "svamp", "file": "svamp_test.jsonl", "limit": 40}], "max_val_problems": 2},
        "benchmarks": {"math500": {"format": "math500", "file": "math500.jsonl", "limit": 2},
                       "aime24": {"format": "aime", "file": "aime24.jsonl", "limit": 2}},
        "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 2, "max_num_steps": 2},
        "generation": {"backend": "transformers", "max_new_tokens": 8},
        "eval": {"num_samples": 2, "pass_k": [1, 2], "val_period": 1, "reward_workers": 0},
        "checkpoint": {"save_period": 1},
        "experiment": {"methods": paper_methods("grpo", "hdpo_frozen_lambda0.1"), "seeds": [1], "benchmarks": ["math500"],
                       "checkpoints": ["final", "best"], "require_gpu": False, **experiment},
        "resources": {"train": {"gpu": 0}, "evaluate": {"gpu": 0}},
    }


@pytest.fixture()
def tiny_repo(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """A copy of the repository's workflow and package (jobs run `python -m hdpo` from it) and a tiny config."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "workflow", root / "workflow")
    shutil.copytree(REPO / "hdpo", root / "hdpo", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "config").mkdir()
    monkeypatch.setenv("HDPO_TINY_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("HDPO_DATA_DIR", str(data_dir))
    write_config(root / "config" / "tiny.yaml", _tiny())
    yield root


def _edit(path: Path) -> None:
    """Change the content (Snakemake ignores a newer file whose recorded checksum is unchanged)."""
    with open(path, "a") as fh:
        fh.write("\n# edited\n")


def test_dag_end_to_end_then_caching_and_reruns(tiny_repo):
    from hdpo.evaluate import model_digest

    root = tiny_repo
    snakefile = root / "workflow" / "Snakefile"
    tiny = root / "config" / "tiny.yaml"

    def plan(configfile=tiny, *targets, extra=()):
        return job_counts(snakemake(root, "-n", "--cores", "2", "--configfile", str(configfile), *extra, *targets,
                                    snakefile=snakefile))

    snakemake(root, "--cores", "2", "--configfile", str(tiny), snakefile=snakefile)
    logs = root / "results" / "logs"
    assert len(list((logs / "train").glob("*.log"))) == 2 and len(list((logs / "evaluate").rglob("*.log"))) == 5
    base = json.loads((root / "results" / "eval" / "base" / "math500.json").read_text())
    assert base["model_step"] == 0 and base["checkpoint"] == "base" and base["num_problems"] == 2
    reused = 0
    for run in ("grpo_seed1", "hdpo_frozen_lambda0.1_seed1"):
        rows = [json.loads(l) for l in (root / "results" / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
        assert [r["step"] for r in rows if r["kind"] == "val"] == [0, 1, 2]
        final, best = (json.loads((root / "results" / "eval" / run / c / "math500.json").read_text())
                       for c in ("final", "best"))
        assert all(r["num_problems"] == 2 and 0.0 <= r["pass@1"] <= 1.0 for r in (final, best))
        # a best policy with the final policy's files (saved at the last step, or unchanged since) copies its result
        same = model_digest(root / "results" / "runs" / run / "policy_best") == final["model_digest"]
        assert ("reused_from" in best) == same
        assert not same or all(best[k] == final[k] for k in ("pass@1", "greedy_acc", "num_samples"))
        reused += same
    assert reused >= 1  # seeded: at least one run's best policy is its final one
    from hdpo.report.figures import FIGURE_NAMES
    from hdpo.report.tables import TABLE_FILES

    for name in FIGURE_NAMES:
        for ext in ("png", "pdf"):
            assert (root / "figures" / f"{name}.{ext}").stat().st_size > 0
    assert all((root / "results" / "tables" / f).stat().st_size > 0 for f in TABLE_FILES)
    assert "base model (step 0)" in (root / "results" / "tables" / "benchmarks.md").read_text()
    assert "[" in (root / "results" / "tables" / "validation.md").read_text()  # intervals from per-problem records
    assert "p=" in (root / "results" / "tables" / "differences.md").read_text()  # paired against GRPO
    # the shareable report: every figure and table CSV inside, with captions
    snakemake(root, "--cores", "1", "--configfile", str(tiny), "--report", "report.zip", snakefile=snakefile)
    import zipfile

    with zipfile.ZipFile(root / "report.zip") as z:
        names = z.namelist()
    assert all(any(n.endswith(f"/{f}.png") for n in names) for f in FIGURE_NAMES)
    assert all(any(n.endswith(f"/{t}.csv") for n in names) for t in ("table1", "validation", "differences"))
    from hdpo.report import method_label, methods_of

    methods = ("grpo", "hdpo_frozen_lambda0.1")
    methods_of(hdpo_config.from_dict({"experiment": {"methods": paper_methods(*methods)}}))  # labels from records
    assert all(m in (root / "results" / "tables" / "table1.csv").read_text() for m in methods)
    assert all(method_label(m) in (root / "results" / "tables" / "table1.md").read_text() for m in methods)
    assert all(method_label(m, "tex") in (root / "results" / "tables" / "table1.tex").read_text() for m in methods)

    assert plan() == {}  # a complete run: nothing to do
    assert plan(tiny, "figures") == {}
    # the untrained model's rows again: the report reruns, no run's evaluation
    assert plan(extra=("--forcerun", "evaluate_base")) == {"evaluate_base": 1, "tables": 1, "figures": 1, "all": 1}
    # every evaluation again (the workflow README's recipe after a fix in hdpo/evaluate.py): all of them
    assert plan(extra=("--forcerun", "evaluate", "evaluate_base")) == {
        "evaluate_base": 1, "evaluate": 4, "tables": 1, "figures": 1, "all": 1}

    # an equal config at another path reruns nothing (the path is not a rerun trigger, the content is)
    same = write_config(root / "same.yaml", _tiny())
    assert plan(same) == {}

    # code edits: the trainer's module reruns nothing; the style file or figures.py only figures; tables.py only
    # tables; the report's shared modules both
    _edit(root / "hdpo" / "train.py")
    assert plan() == {}
    _edit(root / "hdpo" / "plot_style.mplstyle")
    assert plan(tiny, "figures") == {"figures": 1}
    assert plan() == {"figures": 1, "all": 1}
    snakemake(root, "--cores", "2", "--configfile", str(tiny), "figures", snakefile=snakefile)
    assert plan() == {}
    _edit(root / "hdpo" / "report" / "tables.py")
    assert plan() == {"tables": 1, "all": 1}
    _edit(root / "hdpo" / "report" / "figures.py")
    assert plan() == {"tables": 1, "figures": 1, "all": 1}
    assert plan(tiny, "figures") == {"figures": 1}
    _edit(root / "hdpo" / "report" / "frames.py")
    assert plan(tiny, "tables") == {"tables": 1}
    snakemake(root, "--cores", "2", "--configfile", str(tiny), "tables", "figures", snakefile=snakefile)
    assert plan() == {}

    # which jobs rerun on which change: tests/test_workflow_reruns.py, from the workflow README's table
    lr = _tiny()
    lr["optimizer"] = {"lr": 2.0e-6}
    write_config(root / "lr.yaml", lr)

    def work_dirs(configfile):
        out = snakemake(root, "grpo", "-n", "-p", "--forcerun", "train", "--cores", "1", "--configfile",
                        str(configfile), snakefile=snakefile)
        return re.findall(r"--work-dir (\S+)", out)

    old, new = work_dirs(tiny), work_dirs(root / "lr.yaml")
    assert len(old) == 1 and old[0].startswith("results/checkpoints/grpo_seed1/") and new != old
    assert (root / old[0]).is_dir()
    runtime = _tiny()
    runtime["grpo"]["micro_batch_size"] = 1  # speed and memory only
    assert plan(write_config(root / "runtime.yaml", runtime)) == {}
    more_threads = _tiny()
    more_threads["resources"]["train"]["threads"] = 2
    assert plan(write_config(root / "threads.yaml", more_threads)) == {}
    assert work_dirs(root / "runtime.yaml") == old
    # forcing a retrain
    assert plan(tiny, extra=("--forcerun", "train")) == {"train": 2, "evaluate": 4, "tables": 1, "figures": 1,
                                                         "all": 1}

    # deleting a run's outputs retrains that run only; the checkpoints folder (resume) is not an output
    shutil.rmtree(root / "results" / "runs" / "grpo_seed1")
    assert plan() == {"train": 1, "evaluate": 2, "tables": 1, "figures": 1, "all": 1}
    assert (root / old[0]).is_dir()


def test_a_killed_snakemake_is_recovered_by_the_readme_line(tiny_repo):
    """kill -9 of snakemake mid-training: its trainer stops on its own within seconds (--stop-with), and the
    README's recovery line (unlock, then --rerun-incomplete) finishes the target, training resumed."""
    from conftest import tagged_processes

    root = tiny_repo
    tiny = root / "config" / "tiny.yaml"
    once, tag = root / "hang-once", "killed-snakemake"
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HDPO_TEST_TAG=tag,
               HDPO_FAULT="hang@checkpoint:1", HDPO_FAULT_ONCE=str(once))  # the first trainer hangs at step 2
    sm = subprocess.Popen([*SNAKEMAKE, "--cores", "2", "grpo", "--configfile", str(tiny)], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not once.exists() and time.time() < deadline:
        assert sm.poll() is None
        time.sleep(0.2)
    assert once.exists()
    sm.kill()
    sm.wait()
    deadline = time.time() + 15
    while any("train" in _cmdline(p) for p in tagged_processes(tag)) and time.time() < deadline:
        time.sleep(0.2)
    assert not any("train" in _cmdline(p) for p in tagged_processes(tag)), "the trainer outlived its snakemake"

    readme = (REPO / "README.md").read_text()
    (line,) = [l for l in readme.splitlines() if "--unlock" in l and l.startswith("snakemake")]
    command = line.split("#")[0].replace("$D", f"--configfile {tiny}").replace(" --cores all", " --cores 2")
    proc = subprocess.run(["bash", "-c", command], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert job_counts(snakemake(root, "-n", "--cores", "1", "grpo", "--configfile", str(tiny),
                                snakefile=root / "workflow" / "Snakefile")) == {}
    (log,) = (root / "results" / "checkpoints" / "grpo_seed1").glob("*/train.log")
    text = log.read_text()
    assert "the Snakemake that started hdpo train" in text and re.search(r"resumed from .* at step 1", text)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
