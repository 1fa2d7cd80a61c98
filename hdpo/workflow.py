"""What the Snakemake workflow (workflow/) computes from the config; its rule files only wire these together.

Snakemake's config layers merged and typed, the merged config written for the jobs, the grid of runs and their
targets, the settings that decide when a job reruns, per-rule resources, the jobs' interpreter, and the GPUs a
job started on this machine would see.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

import yaml

from hdpo import layout
from hdpo.config import Config, deep_merge, expand_dotted, from_dict, iter_keys, method_overrides
from hdpo.io import atomic_write_text

# --- the config ------------------------------------------------------------------------------------------------


def merge_command_line(config: dict, config_args: Iterable[str]) -> dict:
    """Snakemake's merged config (config/config.yaml, then every --configfile, key by key) with the --config
    values merged over it and dotted keys (`grpo.max_num_steps: 5`) nested. Snakemake reads --config values
    with a YAML loader that keeps every scalar a string ('grpo={max_num_steps: 5}' gives '5'): they are read
    again here as YAML, so numbers and booleans arrive typed."""
    for arg in config_args:
        key, _, raw_value = arg.partition("=")
        config = deep_merge(config, {key: yaml.safe_load(raw_value) if raw_value else None})
    return expand_dotted(config)


def display_path(path: str | Path) -> str:
    """Relative to the working directory when inside it (readable commands and messages), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def config_layers(configfiles: list, overwrite_configfiles: list, config_args: list[str]) -> str:
    """Where the settings came from, for messages: the default config file, every --configfile, --config.
    (Snakemake lists the --configfile files before the default one.)"""
    names = [display_path(p) for p in configfiles[len(overwrite_configfiles):]]
    names.extend(display_path(p) for p in overwrite_configfiles)
    if config_args:
        names.append(f"--config {' '.join(config_args)}")
    return " + ".join(names)


def write_merged_config(cfg: Config) -> str:
    """The merged, validated config (defaults filled in) as the file every job reads, named by its content: the
    DAG and the jobs cannot disagree, and concurrent runs with other settings never overwrite each other's."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    path = f"{layout.CONFIG_DIR}/{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not os.path.exists(path):
        atomic_write_text(path, f"# The merged, validated config the jobs read (named by its content)\n{text}")
    return path


# --- the grid: methods x seeds, then checkpoints x benchmarks ----------------------------------------------------

class Grid:
    """The runs of the config's experiment and the files each produces."""

    def __init__(self, cfg: Config):
        self.records = dict(cfg.experiment.methods)  # name -> MethodRecord
        self.methods = list(self.records)
        self.seeds = [str(s) for s in cfg.experiment.seeds]
        self.benchmarks = list(cfg.experiment.benchmarks)
        self.checkpoints = list(cfg.experiment.checkpoints)
        self._method_of = {layout.run_name(m, s): m for m in self.methods for s in self.seeds}

    def runs(self, methods: Optional[list[str]] = None) -> list[str]:
        return [layout.run_name(m, s) for m in (self.methods if methods is None else methods) for s in self.seeds]

    def method_of(self, run: str) -> str:
        return self._method_of[run]

    def eval_files(self, run: str) -> list[str]:
        return [layout.eval_result(run, c, b) for c in self.checkpoints for b in self.benchmarks]

    def targets(self, methods: Optional[list[str]] = None) -> list[str]:
        """Every run of these methods (all seeds; default all methods) and its benchmark evaluations."""
        return [f for run in self.runs(methods) for f in layout.run_files(run) + self.eval_files(run)]

    def report_inputs(self) -> list[str]:
        """What the tables and figures read: every run's files and evaluations (with their samples), and the
        untrained model's evaluations."""
        evals = [f for run in self.runs() for f in self.eval_files(run)]
        base = [layout.base_eval_result(b) for b in self.benchmarks]
        return (self.targets() + [layout.eval_samples(f) for f in evals]
                + [f for result in base for f in (result, layout.eval_samples(result))])

    def reused_eval(self, run: str, checkpoint: str, bench: str) -> list[str]:
        """A run's best policy is often its final one (the best validation at the last step, or no change since):
        its evaluation waits for the final one's and copies it (`hdpo evaluate --reuse`: only when the model
        files, settings and code are the same) instead of drawing the same samples again. (The untrained model's
        row is not offered: best evaluations would then rerun with every rerun of it, for a rare step-0 best.)"""
        if checkpoint == "best" and "final" in self.checkpoints:
            return [layout.eval_result(run, "final", bench)]
        return []

    def wildcard_constraints(self) -> dict[str, str]:
        """Each wildcard matches only the grid's values, so no rule claims another's files."""
        methods, seeds = _alternatives(self.methods), _alternatives(self.seeds)
        return {"method": methods, "seed": seeds, "run": layout.run_name(f"(?:{methods})", f"(?:{seeds})"),
                "ckpt": _alternatives(self.checkpoints), "bench": _alternatives(self.benchmarks)}

    def lambda_sweep(self) -> list[str]:
        """The GRPO baseline(s) (distill_weight 0) and every HDPO method. Records with `settings` of their own
        differ in more than lambda or teacher, so they join no group."""
        return self._baselines() + self._hdpo_methods()

    def teacher_ablation(self) -> list[str]:
        """The baseline(s) and each frozen/drifting pair that shares a lambda."""
        hdpo = self._hdpo_methods()
        pairs = {(self.records[m].teacher, self.records[m].distill_weight) for m in hdpo}
        partner = {"frozen": "drifting", "drifting": "frozen"}
        return self._baselines() + [m for m in hdpo
                                    if (partner[self.records[m].teacher], self.records[m].distill_weight) in pairs]

    def _baselines(self) -> list[str]:
        return [m for m, r in self.records.items() if not r.settings and r.distill_weight == 0]

    def _hdpo_methods(self) -> list[str]:
        return [m for m, r in self.records.items() if not r.settings and r.distill_weight > 0]


def _alternatives(items: list[str]) -> str:
    """A regex matching exactly these items ('(?!)', which never matches, for none)."""
    return "|".join(re.escape(str(i)) for i in items) if items else "(?!)"


# --- what makes a job rerun ------------------------------------------------------------------------------------
# Snakemake reruns a job when a `params` value changes. Each job gets one `settings` parameter: the JSON of the
# parts of the merged config (as given, before defaults) that can change its result, and nothing else. So adding
# a method, seed or benchmark adds jobs without rerunning the others; an edited learning rate reruns training; a
# method's record reruns that method's runs only (its label only the report); edits inside the hdpo package,
# new keys with defaults included, rerun nothing (see workflow/README.md for forcing a rerun).

# Keys that change speed or memory, not results (declared with `runtime=True` in hdpo/config.py): editing them
# (e.g. after an out-of-memory) reruns nothing.
RUNTIME_ONLY = frozenset(k.key for k in iter_keys() if k.runtime)

TRAIN_SECTIONS = ("model", "data", "grpo", "hdpo", "optimizer", "generation", "eval", "checkpoint")
EVAL_SECTIONS = ("model", "generation", "eval")
EVAL_TRAINING_KEYS = ("val_period", "best_includes_step0")  # eval keys of training: they change no evaluation


class Settings:
    """The `settings` parameter of each rule's jobs, from the merged config as given (`raw`) and as typed."""

    def __init__(self, cfg: Config, raw: dict):
        self.cfg = cfg
        self.raw = json.loads(json.dumps(raw))  # plain types
        self.records = dict(cfg.experiment.methods)

    def data(self) -> str:
        """The split: the `data` section only (a benchmark's settings rewrite that benchmark's file alone)."""
        return _json(_sections(self.raw, "data"))

    def benchmark(self, bench: str) -> str:
        return _json({"benchmark": self._benchmark(bench)})

    def train(self, method: str) -> str:
        """Everything training reads except the grid (method and seed are in the output path), the benchmarks
        and the resources, with the method's record applied. GRPO (distill_weight 0) ignores the rest of
        `hdpo`."""
        settings = _sections(self._method_raw(method), *TRAIN_SECTIONS)
        if self.records[method].distill_weight == 0:
            settings["hdpo"] = {"distill_weight": 0}
        return _json(settings)

    def evaluate(self, method: str, bench: str) -> str:
        return self._evaluation(self._method_raw(method), bench)

    def base_evaluate(self, bench: str) -> str:
        """The untrained model's evaluation: the config's own model, sampling and seed, no method."""
        return _json({"eval": json.loads(self._evaluation(self.raw, bench)), "seed": self.cfg.seed})

    def report(self) -> str:
        typed = self.cfg.to_dict()
        return _json({"experiment": {k: typed["experiment"][k] for k in ("methods", "seeds", "benchmarks",
                                                                           "checkpoints")},
                      "pass_k": typed["eval"]["pass_k"],
                      "best_includes_step0": typed["eval"]["best_includes_step0"]})

    def work_dir(self, method: str, seed: str) -> str:
        """A run's resumable checkpoints: one folder per training settings, so `--resume` only ever continues a
        run made with the same settings (after an edited learning rate the job starts from step 0 anew)."""
        digest = hashlib.sha256(self.train(method).encode()).hexdigest()[:12]
        return layout.work_dir(self.cfg.checkpoint.dir or layout.CHECKPOINTS_DIR, layout.run_name(method, seed),
                               digest)

    def _evaluation(self, raw: dict, bench: str) -> str:
        settings = _sections(raw, *EVAL_SECTIONS)
        for key in EVAL_TRAINING_KEYS:
            settings.get("eval", {}).pop(key, None)
        settings["system_prompt"] = (raw.get("data") or {}).get("system_prompt")
        settings["benchmark"] = self._benchmark(bench)
        return _json(settings)

    def _method_raw(self, method: str) -> dict:
        """The raw config with the method's record applied (its settings, teacher, distill weight); the label is
        left out: it names the method in tables, it changes no result."""
        over = method_overrides(self.records[method])
        over.pop("run", None)
        if self.records[method].distill_weight == 0:  # GRPO: the teacher does not exist
            over["hdpo"].pop("teacher", None)
        return deep_merge(self.raw, over)

    def _benchmark(self, bench: str) -> Optional[dict]:
        return (self.raw.get("benchmarks") or {}).get(bench)  # None: hdpo.config's default for that name


def _sections(raw: dict, *names: str) -> dict:
    """These top-level sections of a raw config, without the runtime-only keys."""
    out = {}
    for name in names:
        if name in raw:
            value = raw[name]
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if f"{name}.{k}" not in RUNTIME_ONLY}
            out[name] = value
    return out


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def mechanism_config(base_file: str | Path, mechanism_file: str | Path) -> tuple[Config, dict]:
    """The mechanism experiment's config (workflow/rules/mechanism.smk): its file layered over the paper's, its two
    methods replacing the paper's grid rather than merged into it. A bad key raises ConfigError."""
    layers = []
    for path in (base_file, mechanism_file):
        with open(path) as fh:
            layers.append(yaml.safe_load(fh) or {})
    raw = deep_merge(*layers)
    raw["experiment"]["methods"] = layers[1]["experiment"]["methods"]
    return from_dict(raw), raw


def measurement_settings(cfg: Config, raw: dict) -> str:
    """What the mechanism's reference responses and measurements read (the model, sampling, prompts, reward,
    `mechanism`), not a method's record: a new lambda retrains HDPO and measures it, and redraws nothing else."""
    return _json({**_sections(raw, "model", "generation", "mechanism"), "system_prompt": cfg.data.system_prompt,
                  "hdpo": {k: v for k, v in raw["hdpo"].items()
                           if k in ("privileged_info", "teacher_min_reward", "topk_logits_k")}})


# --- the jobs: resources, interpreter, code ----------------------------------------------------------------------

RESOURCE_DEFAULTS = {  # per rule, where the config's `resources.<rule>` does not say
    "prepare_data": {"gpu": 0, "threads": 1, "mem_mb": 8000, "runtime": 60},  # prepare_benchmark's too
    "train": {"gpu": 0, "threads": 1, "mem_mb": 16000, "runtime": 600},
    "evaluate": {"gpu": 0, "threads": 1, "mem_mb": 16000, "runtime": 120},
    "report": {"gpu": 0, "threads": 1, "mem_mb": 4000, "runtime": 15},
}


def rule_resource(raw: dict, rule: str, key: str) -> int:
    """A resource of a rule's jobs: the raw config's `resources.<rule>.<key>`, else the workflow's default (the
    typed config's defaults are one set for every rule)."""
    return int((raw.get("resources") or {}).get(rule, {}).get(key, RESOURCE_DEFAULTS[rule][key]))


def gpu_job_token(raw: dict, rule: str) -> int:
    """A job on GPUs holds one `gpu_jobs` token. Snakemake's local executor gives no job GPU ids of its own
    (every job starts at cuda:0), so on one machine a limit of 1 keeps two GPU jobs off the same GPUs; on a
    cluster the token is unlimited. CPU jobs hold none."""
    return 1 if rule_resource(raw, rule, "gpu") > 0 else 0


def most_gpus(raw: dict) -> int:
    """The most GPUs any rule's job asks for."""
    return max(rule_resource(raw, rule, "gpu") for rule in RESOURCE_DEFAULTS)


def python_command(repo: Path, in_conda: bool) -> str:
    """Jobs import the hdpo package beside the workflow. Under `--software-deployment-method conda` they run the
    `python` of the rule's conda env; otherwise the interpreter that runs Snakemake, so `.venv/bin/snakemake`
    works without activating .venv."""
    return (f"PYTHONPATH={shlex.quote(str(repo))}${{PYTHONPATH:+:$PYTHONPATH}} "
            + ("python" if in_conda else shlex.quote(sys.executable)))


def train_launcher(python: str, gpus: int) -> str:
    """torchrun (one process per GPU) when the job has several GPUs, else one Python process."""
    if gpus > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={gpus} -m hdpo"
    return f"{python} -m hdpo"


def reuse_option(reused: list[str]) -> str:
    return " ".join(["--reuse", *map(shlex.quote, reused)]) if reused else ""


# The report's code per rule: tables and figures rerun when code they import changes.
_REPORT_COMMON = ["report/__init__.py", "report/names.py", "report/frames.py", "stats.py", "paper.py", "passk.py"]
_REPORT_CODE = {"tables": _REPORT_COMMON + ["report/tables.py", "ledger.py"],
                "figures": _REPORT_COMMON + ["report/figures.py", "layout.py", "plot_style.mplstyle"]}


def report_code(repo: Path, rule: str) -> list[str]:
    """The files of the hdpo package (in `repo`) that the `tables` or `figures` rule imports."""
    return [display_path(repo / "hdpo" / f) for f in _REPORT_CODE[rule]]


# --- GPUs on one machine -----------------------------------------------------------------------------------------

def visible_gpus() -> tuple[int, str]:
    """GPUs a job started here would see, and where that number comes from. CUDA_VISIBLE_DEVICES where set (a
    scheduler's allocation or the user's choice; CUDA ignores the entries from the first one that is not an
    index or a GPU/MIG UUID, e.g. "-1" or SLURM's "NoDevFiles"), else `nvidia-smi -L` (with MIG on, a process
    sees one MIG device); 0 without either."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return _cuda_visible_count(env), f"CUDA_VISIBLE_DEVICES={env}"
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


def _cuda_visible_count(env: str) -> int:
    count = 0
    for entry in (e.strip() for e in env.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        count += 1
    return count


def local_gpu_limits(gpu: Optional[int], gpu_jobs: Optional[int],
                     count: Callable[[], tuple[int, str]] = visible_gpus) -> tuple[dict[str, int], Optional[str]]:
    """For GPU jobs on one machine, given the `gpu` and `gpu_jobs` limits Snakemake got (None: not given): the
    limits to add, and where the GPU count came from (None: not looked for). Snakemake would start every GPU job
    at once, each on the first GPUs: so with no `gpu` limit the GPUs visible here become it (a train job asking
    for more starts fewer torchrun processes), and GPU jobs run one at a time."""
    limits, source = {}, None
    if gpu is None:
        found, source = count()
        if found > 0:
            limits["gpu"] = gpu = found
    if gpu is not None and gpu_jobs is None:
        limits["gpu_jobs"] = 1
    return limits, source


def no_gpu_limit_message(layers: str, gpus: int, one_machine: bool, source: Optional[str]) -> str:
    """Why GPU jobs cannot start here without a `gpu` limit (none given, none found), and the fixes."""
    if not one_machine:
        why = "--jobs was given, so the workflow does not count this machine's GPUs"
    else:
        why = f"no GPU is visible here ({source})"
    return (f"the config ({layers}) asks for GPUs (resources.*.gpu up to {gpus}) and Snakemake got no GPU limit: "
            f"{why}. Give `--resources gpu=<number of GPUs>`, or on a machine without GPUs use "
            "`--configfile config/demo.yaml`.")
