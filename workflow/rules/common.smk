# Shared set-up: Snakemake's merged config validated once and written for the jobs, the experiment grid,
# wildcard constraints, per-rule resources, the settings that decide when a job reruns, and helpers that list
# targets.
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

REPO = Path(workflow.basedir).parent  # workflow/ lives in the repository root
if str(REPO) not in sys.path:  # the workflow reads the grid with the same typed config as the CLI
    sys.path.insert(0, str(REPO))
from hdpo.config import ConfigError, deep_merge, from_dict, iter_keys, method_overrides  # noqa: E402


def _display_path(path) -> str:
    """Relative to the working directory when inside it (readable commands), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- the config: Snakemake's, merged as in any workflow ---------------------------------------------------
# `config` holds config/config.yaml (the `configfile:` default, when present), then every --configfile in
# order, then --config key=value: mappings merge key by key, a later layer wins. Snakemake reads --config
# values with a YAML loader that keeps every scalar a string ('grpo={max_num_steps: 5}' gives '5'); they are
# read again here as YAML values, so numbers and booleans arrive typed.
for _arg in workflow.config_settings.config_args or []:
    _key, _, _raw_value = _arg.partition("=")
    config.update(deep_merge(config, {_key: yaml.safe_load(_raw_value) if _raw_value else None}))
# A dotted key (`grpo.max_num_steps: 5` in a --configfile) is the same as the nested one.
for _key in [k for k in config if "." in k]:
    _value = config.pop(_key)
    _node = {}
    _top = _node
    for _part in _key.split(".")[:-1]:
        _node = _node.setdefault(_part, {})
    _node[_key.split(".")[-1]] = _value
    config.update(deep_merge(config, _top))

_LAYER_NAMES = [_display_path(p) for p in workflow.configfiles[len(workflow.overwrite_configfiles):]]
_LAYER_NAMES.extend(_display_path(p) for p in workflow.overwrite_configfiles)
if workflow.config_settings.config_args:
    _LAYER_NAMES.append(f"--config {' '.join(workflow.config_settings.config_args)}")
LAYERS = " + ".join(_LAYER_NAMES)  # for messages: where the settings came from

# Validated once, by the typed config (hdpo/config.py), the one source of truth: a bad key fails here, in
# one line, before any job. (workflow/schemas/config.schema.yaml is generated from the same types, for
# editors and readers; a test keeps it in step.)
try:
    CFG = from_dict(config)
except ConfigError as err:
    raise WorkflowError(f"config ({LAYERS or 'built-in defaults'}): {err}") from None
_CFG_DICT = CFG.to_dict()  # every key, defaults filled in

# Every job reads this file: the merged, validated config (defaults filled in), named by its content, so the
# DAG and the jobs cannot disagree and concurrent runs with other settings never overwrite each other's.
_MERGED_TEXT = yaml.safe_dump(_CFG_DICT, sort_keys=False, allow_unicode=True)
CONFIGFILE = f"results/config/{hashlib.sha256(_MERGED_TEXT.encode()).hexdigest()[:12]}.yaml"
if not os.path.exists(CONFIGFILE):
    os.makedirs(os.path.dirname(CONFIGFILE), exist_ok=True)
    _tmp = f"{CONFIGFILE}.{os.getpid()}.tmp"
    with open(_tmp, "w") as _fh:
        _fh.write(f"# The merged, validated config the jobs read (named by its content)\n{_MERGED_TEXT}")
    os.replace(_tmp, CONFIGFILE)

# --- the grid ----------------------------------------------------------------------------------------------
RECORDS = {name: rec for name, rec in CFG.experiment.methods.items()}  # name -> MethodRecord
METHODS = list(RECORDS)
SEEDS = [str(s) for s in CFG.experiment.seeds]
BENCHMARKS = list(CFG.experiment.benchmarks)
CHECKPOINTS = list(CFG.experiment.checkpoints)
RUNS = [f"{m}_seed{s}" for m in METHODS for s in SEEDS]
RUN_METHOD = {f"{m}_seed{s}": m for m in METHODS for s in SEEDS}


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
    return int((_RAW.get("resources") or {}).get(rule_name, {}).get(key, _RESOURCE_DEFAULTS[rule_name][key]))


def gpu_job_token(rule_name: str) -> int:
    """A job on GPUs holds one `gpu_jobs` token. Snakemake's local executor gives no job GPU ids of its own
    (every job starts at cuda:0), so on one machine a limit of 1 (set below, or by the local profile) keeps
    two GPU jobs off the same GPUs; on a cluster the token is unlimited. CPU jobs hold none."""
    return 1 if resource(rule_name, "gpu") > 0 else 0


# --- what makes a job rerun --------------------------------------------------------------------------------
# Snakemake reruns a job when a `params` value changes. Each job gets one `settings` parameter: the JSON of
# the parts of the merged config (as given, before defaults) that can change its result, and nothing else.
# So adding a method, seed or benchmark adds jobs without rerunning the others; an edited learning rate
# reruns training; a method's record reruns that method's runs only (its label only the report); edits
# inside the hdpo package, new keys with defaults included, rerun nothing (see workflow/README.md for
# forcing a rerun).
_RAW = json.loads(json.dumps(config))  # the merged config as given, plain types
# Keys that change speed or memory, not results: editing them (e.g. after an out-of-memory) reruns nothing.
# They are the keys declared with `runtime=True` in hdpo/config.py.
RUNTIME_ONLY = {k.key for k in iter_keys() if k.runtime}


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _sections(raw: dict, *names: str) -> dict:
    """These top-level sections of a raw config, without the runtime-only keys."""
    out = {}
    for name in names:
        if name not in raw:
            continue
        value = raw[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if f"{name}.{k}" not in RUNTIME_ONLY}
        out[name] = value
    return out


def _method_raw(method: str) -> dict:
    """The raw merged config with the method's record applied (its settings, teacher, distill weight);
    the label is left out: it names the method in tables, it changes no result."""
    over = method_overrides(RECORDS[method])
    over.pop("run", None)
    if RECORDS[method].distill_weight == 0:  # GRPO: the teacher does not exist
        over["hdpo"].pop("teacher", None)
    return deep_merge(_RAW, over)


def _benchmark_spec(bench: str):
    return (_RAW.get("benchmarks") or {}).get(bench)  # None: hdpo.config's default for that name


def data_settings() -> str:
    return _json({**_sections(_RAW, "data"), "benchmarks": {b: _benchmark_spec(b) for b in BENCHMARKS}})


def train_settings(wildcards) -> str:
    """Everything training reads except the grid (method and seed are in the output path), the benchmarks and
    the resources, with the method's record applied. GRPO (distill_weight 0) ignores the rest of `hdpo`."""
    raw = _method_raw(wildcards.method)
    d = _sections(raw, "model", "data", "grpo", "hdpo", "optimizer", "generation", "eval", "checkpoint")
    if RECORDS[wildcards.method].distill_weight == 0:
        d["hdpo"] = {"distill_weight": 0}
    return _json(d)


def _evaluate_settings(raw: dict, bench: str) -> str:
    d = _sections(raw, "model", "generation", "eval")
    for key in ("val_period", "best_includes_step0"):  # training-time keys: they change no evaluation
        d.get("eval", {}).pop(key, None)
    d["system_prompt"] = (raw.get("data") or {}).get("system_prompt")
    d["benchmark"] = _benchmark_spec(bench)
    return _json(d)


def evaluate_settings(wildcards) -> str:
    return _evaluate_settings(_method_raw(RUN_METHOD[wildcards.run]), wildcards.bench)


def base_evaluate_settings(wildcards) -> str:
    """The untrained model's evaluation: the config's own model, sampling and seed, no method."""
    return _json({"eval": json.loads(_evaluate_settings(_RAW, wildcards.bench)), "seed": CFG.seed})


def report_settings() -> str:
    return _json({"experiment": {k: _CFG_DICT["experiment"][k] for k in ("methods", "seeds", "benchmarks",
                                                                           "checkpoints")},
                  "pass_k": _CFG_DICT["eval"]["pass_k"],
                  "best_includes_step0": _CFG_DICT["eval"]["best_includes_step0"]})


def configfile_arg(wildcards, input) -> str:
    """The merged config's path, passed as `--config`. It takes `input`, so Snakemake counts it as derived and
    never reruns a job because the path changed: other settings rerun only what their `settings` change."""
    return CONFIGFILE


def method_arg(wildcards, input) -> str:
    """The evaluated run's method (its record's settings apply to evaluation too); derived, like the path."""
    return RUN_METHOD[wildcards.run]


def reuse_input(wildcards) -> list[str]:
    """A run's best policy is often its final one (the best validation at the last step, or no change since).
    Its evaluation waits for the final one's and copies it (`hdpo evaluate --reuse`: only when the model files,
    settings and code are the same) instead of drawing the same samples again. (The untrained model's row is
    not offered: best evaluations would then rerun with every rerun of it, for a rare step-0 best.)"""
    if wildcards.ckpt == "best" and "final" in CHECKPOINTS:
        return [f"results/eval/{wildcards.run}/final/{wildcards.bench}.json"]
    return []


def reuse_arg(wildcards, input) -> str:
    return " ".join(["--reuse", *map(shlex.quote, input.reuse)]) if input.reuse else ""


# Jobs import the hdpo package beside this workflow. Under `--software-deployment-method conda` they run the
# `python` of the rule's conda env (workflow/envs/hdpo.yaml: the dependencies); otherwise the interpreter
# that runs Snakemake, so `.venv/bin/snakemake` works without activating .venv.
_IN_CONDA = any(m.name == "CONDA" for m in workflow.deployment_settings.deployment_method)
PYTHON = (f"PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}} "
          + ("python" if _IN_CONDA else shlex.quote(sys.executable)))


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


# Groups, from the records' fields (records with extra `settings` differ in more than lambda or teacher, so
# they join no group). lambda sweep: the GRPO baseline(s) (distill_weight 0) and every HDPO method.
_PLAIN = {m: r for m, r in RECORDS.items() if not r.settings}
BASELINE = [m for m, r in _PLAIN.items() if r.distill_weight == 0]
HDPO_METHODS = [m for m, r in _PLAIN.items() if r.distill_weight > 0]
LAMBDA_SWEEP = BASELINE + HDPO_METHODS
# teacher ablation: the baseline and each frozen/drifting pair that shares a lambda.
_BY_TEACHER = {(r.teacher, r.distill_weight) for m, r in _PLAIN.items() if r.distill_weight > 0}
TEACHER_ABLATION = BASELINE + [
    m for m in HDPO_METHODS
    if ({"frozen": "drifting", "drifting": "frozen"}[RECORDS[m].teacher], RECORDS[m].distill_weight) in _BY_TEACHER]

# The software of every job (deployed with `--sdm conda`; otherwise jobs run in the current environment).
# Relative to the .smk file that uses it, as `conda:` paths are.
CONDA_ENV = "../envs/hdpo.yaml"


def visible_gpus() -> tuple[int, str]:
    """GPUs a job started here would see, and where that number comes from. CUDA_VISIBLE_DEVICES where set (a
    scheduler's allocation or the user's choice; CUDA ignores the entries from the first one that is not an
    index or a GPU/MIG UUID, e.g. "-1" or SLURM's "NoDevFiles"), else `nvidia-smi -L` (with MIG on, a process
    sees one MIG device); 0 without either."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        count = 0
        for entry in (e.strip() for e in env.split(",")):
            if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
                break
            count += 1
        return count, f"CUDA_VISIBLE_DEVICES={env}"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        print("hdpo: nvidia-smi -L did not answer in 15 s: counting no GPUs", file=sys.stderr)
        return 0, "nvidia-smi (no answer)"
    except (OSError, subprocess.SubprocessError):
        return 0, "no nvidia-smi"
    lines = out.stdout.splitlines() if out.returncode == 0 else []
    if any(line.strip().startswith("MIG ") for line in lines):
        return 1, "nvidia-smi -L (MIG: one device per process)"
    return sum(line.startswith("GPU ") for line in lines), "nvidia-smi -L"


def _given(name: str):
    """A global resource as given on the command line or in a profile (None when not given)."""
    value = workflow.global_resources.get(name)
    return getattr(value, "value", value)  # Snakemake 9 wraps values in Resource objects, 8 does not


# GPU jobs on one machine (Snakemake's local executor: no --jobs, so no nodes) with no `gpu` limit given:
# Snakemake would start them all at once, and every one on the first GPUs. So the GPUs visible here become the
# limit (a train job asking for more starts fewer torchrun processes) and GPU jobs run one at a time (the
# `gpu_jobs` token): `snakemake --cores all` runs the paper on a GPU node. Set at parse time, as Snakemake sizes
# each job against these limits when it builds the DAG. With none visible the run stops before any job (below).
GPU_JOBS = max(resource(name, "gpu") for name in _RESOURCE_DEFAULTS)
_ONE_MACHINE = _given("_nodes") is None
_VISIBLE = None
if GPU_JOBS > 0 and _ONE_MACHINE and getattr(workflow, "is_main_process", True):
    if _given("gpu") is None:
        _VISIBLE = visible_gpus()
        if _VISIBLE[0] > 0:
            workflow.global_resources["gpu"] = _VISIBLE[0]
            print(f"hdpo: no gpu limit given: using the {_VISIBLE[0]} GPU(s) visible here ({_VISIBLE[1]}), "
                  f"one GPU job at a time (as --resources gpu={_VISIBLE[0]} gpu_jobs=1)", file=sys.stderr)
    if _given("gpu") is not None and _given("gpu_jobs") is None:
        workflow.global_resources["gpu_jobs"] = 1


def _check_gpu_limit():
    """GPU jobs on one machine and no GPU limit (none given, none found): stop before any job, naming why."""
    if GPU_JOBS == 0 or not workflow.local_exec or _given("gpu") is not None or workflow.touch:
        return
    if not _ONE_MACHINE:
        why = "--jobs was given, so the workflow does not count this machine's GPUs"
    else:  # one machine, no limit: the parse above looked, and found none
        why = f"no GPU is visible here ({_VISIBLE[1]})"
    raise WorkflowError(
        f"the config ({LAYERS}) asks for GPUs (resources.*.gpu up to {GPU_JOBS}) and Snakemake got no GPU limit: "
        f"{why}. Give `--resources gpu=<number of GPUs>`, or on a machine without GPUs use "
        "`--configfile config/demo.yaml`.")


onstart:
    _check_gpu_limit()
