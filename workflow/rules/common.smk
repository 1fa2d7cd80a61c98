# Shared set-up, wired from hdpo/workflow.py and hdpo/layout.py (where the logic lives, tested with pytest): the
# merged config validated once and written for the jobs, the grid and its wildcard constraints, the settings that
# decide when a job reruns, per-rule resources, and the GPU limits of one machine.
import functools
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

REPO = Path(workflow.basedir).parent  # workflow/ lives in the repository root
if str(REPO) not in sys.path:  # the workflow reads the grid with the same typed config as the CLI
    sys.path.insert(0, str(REPO))
from hdpo import workflow as plan  # noqa: E402  (`workflow` here is Snakemake's own object)
from hdpo.config import ConfigError, from_dict  # noqa: E402
from hdpo.layout import (DATA_DIR, FIGURES, RUN, TABLES, base_eval_result, eval_result, eval_samples,  # noqa: E402
                         policy_dir, run_dir)

# --- the config: Snakemake's layers, with --config values typed and dotted keys nested ------------------------
_CONFIG_ARGS = workflow.config_settings.config_args or []
_merged = plan.merge_command_line(config, _CONFIG_ARGS)
config.clear()
config.update(_merged)
LAYERS = plan.config_layers(workflow.configfiles, workflow.overwrite_configfiles, _CONFIG_ARGS)

# Validated once, by the typed config (hdpo/config.py), the one source of truth: a bad key fails here, in one
# line, before any job. (workflow/schemas/config.schema.yaml is generated from the same types; a test keeps it
# in step.)
try:
    CFG = from_dict(config)
except ConfigError as err:
    raise WorkflowError(f"config ({LAYERS or 'built-in defaults'}): {err}") from None
CONFIGFILE = plan.write_merged_config(CFG)  # every job reads this file
RAW = config  # the merged config as given (before defaults): what the rerun settings are made of

GRID = plan.Grid(CFG)
SETTINGS = plan.Settings(CFG, RAW)


wildcard_constraints:
    **GRID.wildcard_constraints(),


resource = functools.partial(plan.rule_resource, RAW)  # resource("train", "mem_mb")
gpu_job_token = functools.partial(plan.gpu_job_token, RAW)

# The software of every job (deployed with `--sdm conda`; otherwise jobs run in the current environment).
# Relative to the .smk file that uses it, as `conda:` paths are.
CONDA_ENV = "../envs/hdpo.yaml"
PYTHON = plan.python_command(REPO, any(m.name == "CONDA" for m in workflow.deployment_settings.deployment_method))
CODE = {rule: plan.report_code(REPO, rule) for rule in ("tables", "figures")}


# --- params that take `input` (or `resources`): Snakemake counts them as derived and never reruns a job because
# they changed (another path, venv or GPU count); the `settings` param alone decides reruns ---------------------
def configfile_arg(wildcards, input):
    return CONFIGFILE


def python_arg(wildcards, input):
    return PYTHON


def method_arg(wildcards, input):
    """The evaluated run's method (its record's settings apply to evaluation too)."""
    return GRID.method_of(wildcards.run)


def snakemake_pid(wildcards, input):
    """Long jobs stop themselves once this Snakemake is gone (hdpo --stop-with): no orphan after a kill -9."""
    return os.getpid()


def reuse_arg(wildcards, input):
    return plan.reuse_option(input.reuse)


def work_dir(wildcards, input):
    """Resumable checkpoints: deliberately NOT a declared output (Snakemake deletes outputs before a job)."""
    return SETTINGS.work_dir(wildcards.method, wildcards.seed)


def train_launcher(wildcards, resources):
    """A job scaled down to fewer GPUs (e.g. `--resources gpu=4`) starts fewer processes, retraining nothing."""
    return plan.train_launcher(PYTHON, int(resources.gpu))


def reuse_input(wildcards):
    return GRID.reused_eval(wildcards.run, wildcards.ckpt, wildcards.bench)


def _reported(paths, kind):
    """report() around what a reader opens (CSV tables, PNG figures), each with its caption file."""
    out = []
    for path in paths:
        name = Path(path).stem
        if kind == "tables" and path.endswith(".csv"):
            out.append(report(path, caption="../report/tables.rst", category="Tables", labels={"table": name}))
        elif kind == "figures" and path.endswith(".png"):
            out.append(report(path, caption=f"../report/{name}.rst", category="Figures", labels={"figure": name}))
        else:
            out.append(path)
    return out


# --- GPUs on one machine ---------------------------------------------------------------------------------------
def _given(name: str):
    """A global resource as given on the command line or in a profile (None when not given)."""
    value = workflow.global_resources.get(name)
    return getattr(value, "value", value)  # Snakemake 9 wraps values in Resource objects, 8 does not


# Snakemake's local executor (no --jobs, so no nodes) would start every GPU job at once on the first GPUs:
# without a `gpu` limit the GPUs visible here become it, and GPU jobs run one at a time (plan.local_gpu_limits).
# Set at parse time, as Snakemake sizes each job against these limits when it builds the DAG; with no GPU
# visible the run stops before any job (onstart).
GPU_JOBS = plan.most_gpus(RAW)
_ONE_MACHINE = _given("_nodes") is None
_GPU_SOURCE = None
if GPU_JOBS > 0 and _ONE_MACHINE and getattr(workflow, "is_main_process", True):
    _limits, _GPU_SOURCE = plan.local_gpu_limits(_given("gpu"), _given("gpu_jobs"))
    for _name, _value in _limits.items():
        workflow.global_resources[_name] = _value
    if "gpu" in _limits:
        print(f"hdpo: no gpu limit given: using the {_limits['gpu']} GPU(s) visible here ({_GPU_SOURCE}), one GPU "
              f"job at a time (as --resources gpu={_limits['gpu']} gpu_jobs=1)", file=sys.stderr)


def _only_cpu_targets() -> bool:
    """The mechanism experiment's targets alone (rules/mechanism.smk): its own CPU config, no GPU job."""
    targets = set(workflow.dag_settings.targets or ())
    return bool(targets) and all(t == "mechanism" or t.startswith(("mechanism_", "results/mechanism/"))
                                 for t in targets)


onstart:
    if (GPU_JOBS > 0 and workflow.local_exec and _given("gpu") is None and not workflow.touch
            and not _only_cpu_targets()):
        raise WorkflowError(plan.no_gpu_limit_message(LAYERS, GPU_JOBS, _ONE_MACHINE, _GPU_SOURCE))
