# Shared set-up: which config file the jobs read, validation, the experiment grid, wildcard constraints,
# per-rule resources, the settings that decide when a job reruns, and helpers that list targets.
import hashlib
import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

REPO = Path(workflow.basedir).parent  # workflow/ lives in the repository root
if str(REPO) not in sys.path:  # the workflow reads the grid with the same typed config as the CLI
    sys.path.insert(0, str(REPO))
from hdpo.config import Config, ConfigError, from_dict, parse_method  # noqa: E402


def _display_path(path) -> str:
    """Relative to the working directory when inside it (readable commands), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- the config file every job reads ----------------------------------------------------------------------
# Jobs read ONE config file (`hdpo ... --config FILE`): the one given with --configfile, else the default
# named by `configfile:` in the Snakefile. Snakemake itself would *merge* a --configfile over the default
# one; `config` is reset to the chosen file's content below, so the DAG and the jobs see the same settings.
if workflow.config_settings.config:
    raise WorkflowError(
        "`--config key=value` overrides are not supported: jobs read the config file, not Snakemake's "
        "merged config. Copy config/config.yaml (or config/demo.yaml), edit the copy and pass it with "
        "`--configfile`.")
if len(workflow.overwrite_configfiles) > 1:
    raise WorkflowError(
        "give at most one --configfile (jobs read exactly one config file); got: "
        + ", ".join(_display_path(p) for p in workflow.overwrite_configfiles))
CONFIGFILE = _display_path(workflow.overwrite_configfiles[0] if workflow.overwrite_configfiles
                           else DEFAULT_CONFIGFILE)

with open(CONFIGFILE) as _fh:
    _raw = yaml.safe_load(_fh) or {}
if not isinstance(_raw, dict):
    raise WorkflowError(f"{CONFIGFILE}: the top level must be a mapping")
config.clear()
config.update(_raw)

# Names and types, against the schema (a misspelt key fails here, before any job)...
validate(config, "../schemas/config.schema.yaml", set_default=False)

# ...then values, with the CLI's own typed config.
try:
    CFG = from_dict(config)
except ConfigError as err:
    raise WorkflowError(f"{CONFIGFILE}: {err}") from None
_CFG_DICT = CFG.to_dict()  # every key, defaults filled in

# --- the grid ----------------------------------------------------------------------------------------------
METHODS = list(CFG.experiment.methods)
SEEDS = [str(s) for s in CFG.experiment.seeds]
BENCHMARKS = list(CFG.experiment.benchmarks)
CHECKPOINTS = list(CFG.experiment.checkpoints)
RUNS = [f"{m}_seed{s}" for m in METHODS for s in SEEDS]


def _alternatives(items) -> str:
    return "|".join(re.escape(str(i)) for i in items) if items else "(?!)"  # (?!) never matches


wildcard_constraints:
    method=_alternatives(METHODS),
    seed=_alternatives(SEEDS),
    run=f"(?:{_alternatives(METHODS)})_seed(?:{_alternatives(SEEDS)})",
    ckpt=_alternatives(CHECKPOINTS),
    bench=_alternatives(BENCHMARKS),


# --- resources per rule: config `resources.<rule>`, else these defaults -----------------------------------
_RESOURCE_DEFAULTS = {
    "prepare_data": {"gpu": 0, "threads": 1, "mem_mb": 8000, "runtime": 60},
    "train": {"gpu": 0, "threads": 1, "mem_mb": 16000, "runtime": 600},
    "evaluate": {"gpu": 0, "threads": 1, "mem_mb": 16000, "runtime": 120},
    "report": {"gpu": 0, "threads": 1, "mem_mb": 4000, "runtime": 15},
}


def resource(rule_name: str, key: str) -> int:
    return int((config.get("resources") or {}).get(rule_name, {}).get(key, _RESOURCE_DEFAULTS[rule_name][key]))


# --- what makes a job rerun --------------------------------------------------------------------------------
# Snakemake reruns a job when a `params` value changes. Each job gets one `settings` parameter: the JSON of
# the parts of the config FILE (as written, before defaults) that can change its result, and nothing else.
# So adding a method, seed or benchmark adds jobs without rerunning the others; an edited learning rate
# reruns training; edits inside the hdpo package, new keys with defaults included, rerun nothing (see
# workflow/README.md for forcing a rerun).
_RAW = json.loads(json.dumps(config))  # the config file's content, plain types
# Keys that change speed or memory, not results: editing them (e.g. after an out-of-memory) reruns nothing.
RUNTIME_ONLY = {"grpo.micro_batch_size", "generation.batch_size", "generation.gpu_memory_utilization",
                "eval.reward_workers", "checkpoint.save_period", "checkpoint.dir", "checkpoint.tensorboard"}


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _sections(*names: str) -> dict:
    """These top-level sections of the config file, without the runtime-only keys."""
    out = {}
    for name in names:
        if name not in _RAW:
            continue
        value = _RAW[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{name}.{k}" not in RUNTIME_ONLY}
        out[name] = value
    return out


def _benchmark_spec(bench: str):
    return (_RAW.get("benchmarks") or {}).get(bench)  # None: hdpo.config's default for that name


def data_settings() -> str:
    return _json({**_sections("data"), "benchmarks": {b: _benchmark_spec(b) for b in BENCHMARKS}})


def train_settings(wildcards) -> str:
    """Everything training reads except the grid (method and seed are in the output path), the benchmarks and
    the resources. The method sets hdpo.method/teacher/distill_weight; GRPO ignores the hdpo section."""
    d = _sections("model", "data", "grpo", "hdpo", "optimizer", "generation", "eval", "checkpoint")
    if parse_method(wildcards.method)["hdpo.method"] == "grpo":
        d.pop("hdpo", None)
    elif "hdpo" in d:
        d["hdpo"] = {k: v for k, v in d["hdpo"].items() if k not in ("method", "teacher", "distill_weight")}
    return _json(d)


def evaluate_settings(wildcards) -> str:
    d = _sections("model", "generation", "eval")
    d.get("eval", {}).pop("val_period", None)
    d["system_prompt"] = (_RAW.get("data") or {}).get("system_prompt")
    d["benchmark"] = _benchmark_spec(wildcards.bench)
    return _json(d)


def report_settings() -> str:
    return _json({"experiment": {k: _CFG_DICT["experiment"][k] for k in ("methods", "seeds", "benchmarks",
                                                                           "checkpoints")},
                  "pass_k": _CFG_DICT["eval"]["pass_k"]})


def configfile_arg(wildcards, input) -> str:
    """The path passed as `--config`. It takes `input`, so Snakemake counts it as derived and never reruns a
    job because the path changed: an edited copy of the config at another path (say with one more seed)
    reruns only what its `settings` change."""
    return CONFIGFILE


# Jobs run with the interpreter that runs Snakemake, so `.venv/bin/snakemake` works without activating .venv.
PYTHON = shlex.quote(sys.executable)


def python_arg(wildcards, input) -> str:
    """The interpreter, as a derived param (it takes `input`): another venv path reruns nothing."""
    return PYTHON


def train_launcher(wildcards, resources) -> str:
    """torchrun (one process per GPU) when the job has several GPUs, else one Python process.

    It reads `resources`, so it is derived too: a different GPU count (e.g. `--resources gpu=4` scales the
    job down on a smaller machine) does not retrain a finished run."""
    gpus = int(resources.gpu)
    if gpus > 1:
        return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node={gpus} -m hdpo"
    return f"{PYTHON} -m hdpo"


def work_dir(wildcards, input) -> str:
    """Resumable checkpoints of one run: deliberately NOT a declared output (Snakemake deletes outputs before a
    job starts). One sub-folder per training settings, so `--resume` only ever continues a run made with the
    same settings: after an edited learning rate the job starts from step 0 in a new folder. (It takes
    `input` to count as derived: `settings` already decides reruns, and checkpoint.dir is runtime-only.)"""
    root = CFG.checkpoint.dir or "results/checkpoints"
    digest = hashlib.sha256(train_settings(wildcards).encode()).hexdigest()[:12]
    return f"{root}/{wildcards.method}_seed{wildcards.seed}/{digest}"


# --- targets -----------------------------------------------------------------------------------------------
DATA_DIR = "results/data"
# The report's code per job (rules/report.smk): tables and figures rerun when code they import changes.
_REPORT_COMMON = ["report/__init__.py", "report/names.py", "report/frames.py", "stats.py", "paper.py", "passk.py"]
CODE = {
    "tables": [_display_path(REPO / "hdpo" / f) for f in _REPORT_COMMON + ["report/tables.py", "ledger.py"]],
    "figures": [_display_path(REPO / "hdpo" / f) for f in _REPORT_COMMON + ["report/figures.py",
                                                                           "plot_style.mplstyle"]],
}
TABLE_NAMES = ["table1", "validation", "differences", "benchmarks"]  # each as .csv (the truth), .md, .tex
TABLES = [f"results/tables/{n}.{ext}" for n in TABLE_NAMES for ext in ("csv", "md", "tex")] + [
    "results/tables/benchmarks_intervals.csv", "results/tables/cliffs.csv", "results/tables/cliffs.md"]
FIGURE_NAMES = ["val_passk", "training", "cliffs", "cliff_recovery", "passk_curve", "lambda_sweep", "forest",
                "benchmarks"]
FIGURES = [f"figures/{n}.{ext}" for n in FIGURE_NAMES for ext in ("png", "pdf")]


def run_files(run: str) -> list[str]:
    """The aggregated files of one training run (what the report reads; never the checkpoints)."""
    return [f"results/runs/{run}/metrics.jsonl", f"results/runs/{run}/summary.json",
            f"results/runs/{run}/cliffs.jsonl", f"results/runs/{run}/val_problems.jsonl.gz"]


def eval_files(run: str) -> list[str]:
    return [f"results/eval/{run}/{c}/{b}.json" for c in CHECKPOINTS for b in BENCHMARKS]


def runs_of(methods) -> list[str]:
    return [f"{m}_seed{s}" for m in methods for s in SEEDS]


def targets_of(methods) -> list[str]:
    """Every run of these methods (all seeds) and its benchmark evaluations."""
    return [f for run in runs_of(methods) for f in run_files(run) + eval_files(run)]


# What the report rules read, and report() around what a reader opens (rules/report.smk).
BASE_EVAL = [f"results/eval/base/{b}.{ext}" for b in BENCHMARKS for ext in ("json", "samples.jsonl.gz")]
REPORT_INPUTS = [f for run in RUNS for f in run_files(run) + eval_files(run)] + [
    f.replace(".json", ".samples.jsonl.gz") for run in RUNS for f in eval_files(run)] + BASE_EVAL


def _reported(paths, kind):
    """report() around what a reader opens (CSV tables, PNG figures), each with its caption file."""
    out = []
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if kind == "tables" and path.endswith(".csv"):
            out.append(report(path, caption="../report/tables.rst", category="Tables", labels={"table": name}))
        elif kind == "figures" and path.endswith(".png"):
            out.append(report(path, caption=f"../report/{name}.rst", category="Figures", labels={"figure": name}))
        else:
            out.append(path)
    return out


def _lambda_of(method: str) -> float:
    return float(parse_method(method)["hdpo.distill_weight"])


HDPO_METHODS = [m for m in METHODS if m != "grpo"]
BASELINE = ["grpo"] if "grpo" in METHODS else []
# lambda sweep: the baseline (lambda = 0) and every HDPO method, whatever its teacher.
LAMBDA_SWEEP = BASELINE + HDPO_METHODS
# teacher ablation: the baseline and each frozen/drifting pair that shares a lambda.
_BY_TEACHER = {(parse_method(m)["hdpo.teacher"], _lambda_of(m)): m for m in HDPO_METHODS}
TEACHER_ABLATION = BASELINE + [m for m in HDPO_METHODS
                               if ({"frozen": "drifting", "drifting": "frozen"}[parse_method(m)["hdpo.teacher"]],
                                   _lambda_of(m)) in _BY_TEACHER]

# The software of every job (deployed with `--sdm conda`; otherwise jobs run in the current environment).
# Relative to the .smk file that uses it, as `conda:` paths are.
CONDA_ENV = "../envs/hdpo.yaml"


def _check_gpu_limit():
    """On one machine without a `gpu` limit, Snakemake would start every GPU job at once (five 8-GPU
    trainings on one node). Stop before any job instead, naming the fix."""
    wants = max(resource(name, "gpu") for name in _RESOURCE_DEFAULTS)
    if wants > 0 and workflow.local_exec and "gpu" not in workflow.global_resources:
        raise WorkflowError(
            f"{CONFIGFILE} asks for GPUs (resources.*.gpu up to {wants}) but Snakemake got no GPU limit: on one "
            "machine it would start all GPU jobs at once. Run with `--profile workflow/profiles/local` (8 GPUs, "
            "one evaluation at a time) or give `--resources gpu=<number of GPUs>`. On a machine without GPUs use "
            "`--configfile config/demo.yaml`.")


onstart:
    _check_gpu_limit()
