# The mechanism experiment (issue 23): `snakemake --cores all mechanism`.
# Its own config, config/mechanism.yaml layered over config/config.yaml whatever --configfile says, and its own
# files under results/mechanism/ (data, runs, checkpoints, measurements), so it never touches the main grid:
#   mechanism_data -> mechanism_train(method, seed) -> mechanism_measure(run) -+-> mechanism (table + figure)
#   mechanism_reference (the untrained model's privileged responses) --------+
# Reruns follow the same settings as the main grid's jobs (hdpo.workflow.Settings of this config).
import json

import yaml

from hdpo.config import deep_merge

MECH = "results/mechanism"


def _mechanism_config():
    layers = []
    for path in (DEFAULT_CONFIGFILE, REPO / "config" / "mechanism.yaml"):
        with open(path) as fh:
            layers.append(yaml.safe_load(fh) or {})
    raw = deep_merge(*layers)
    raw["experiment"]["methods"] = layers[1]["experiment"]["methods"]  # its two methods replace the paper's grid
    try:
        return from_dict(raw), raw
    except ConfigError as err:
        raise WorkflowError(f"config/mechanism.yaml: {err}") from None


MECH_CFG, MECH_RAW = _mechanism_config()
MECH_CONFIGFILE = plan.write_merged_config(MECH_CFG)
MECH_SETTINGS = plan.Settings(MECH_CFG, MECH_RAW)
MECH_METHODS = list(MECH_CFG.experiment.methods)
MECH_RUNS = [f"{m}_seed{s}" for m in MECH_METHODS for s in MECH_CFG.experiment.seeds]
MECH_RUN = "{mmethod}_seed{mseed}"
# What the reference responses and the measurements read (the model, sampling, prompts, reward, `mechanism`),
# not a method's record: a new lambda retrains HDPO and measures it, and redraws nothing else.
MECH_MEASURE_SETTINGS = json.dumps(
    {**plan._sections(MECH_RAW, "model", "generation", "mechanism"),
     "system_prompt": MECH_CFG.data.system_prompt,
     "hdpo": {k: v for k, v in MECH_RAW["hdpo"].items() if k in ("privileged_info", "teacher_min_reward",
                                                                 "topk_logits_k")}}, sort_keys=True)
mech_resource = functools.partial(plan.rule_resource, MECH_RAW)


def mech_configfile(wildcards, input):
    return MECH_CONFIGFILE


wildcard_constraints:
    mmethod="|".join(MECH_METHODS),
    mseed=r"\d+",


rule mechanism_data:
    output:
        train=f"{MECH}/data/train.jsonl",
        val=f"{MECH}/data/val.jsonl",
        summary=f"{MECH}/data/summary.json",
    params:
        settings=MECH_SETTINGS.data(),
        config=mech_configfile,
        python=python_arg,
    log:
        f"{MECH}/logs/data.log",
    threads: 1
    shell:
        "{params.python} -m hdpo prepare-data --config {params.config:q} --out {MECH}/data --splits > {log:q} 2>&1"


rule mechanism_train:
    input:
        train=f"{MECH}/data/train.jsonl",
        val=f"{MECH}/data/val.jsonl",
    output:
        metrics=f"{MECH}/runs/{MECH_RUN}/metrics.jsonl",
        summary=f"{MECH}/runs/{MECH_RUN}/summary.json",
        cliffs=f"{MECH}/runs/{MECH_RUN}/cliffs.jsonl",
        final=directory(f"{MECH}/runs/{MECH_RUN}/policy_final"),
    params:
        settings=lambda wildcards: MECH_SETTINGS.train(wildcards.mmethod),
        config=mech_configfile,
        python=python_arg,
        run_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        work_dir=lambda wildcards, input: MECH_SETTINGS.work_dir(wildcards.mmethod, wildcards.mseed),
        snakemake_pid=snakemake_pid,
    log:
        f"{MECH}/logs/train/{MECH_RUN}.log",
    benchmark:
        f"{MECH}/benchmarks/train/{MECH_RUN}.tsv"
    threads: mech_resource("train", "threads")
    resources:
        mem_mb=mech_resource("train", "mem_mb"),
        runtime=mech_resource("train", "runtime"),
    shell:
        "{params.python} -m hdpo train --config {params.config:q} --method {wildcards.mmethod}"
        " --seed {wildcards.mseed} --data {MECH}/data --run-dir {params.run_dir:q} --work-dir {params.work_dir:q}"
        " --model-cache results/models --resume --threads {threads} --stop-with {params.snakemake_pid}"
        " > {log:q} 2>&1"


rule mechanism_reference:
    input:
        train=f"{MECH}/data/train.jsonl",
    output:
        f"{MECH}/reference.jsonl",
    params:
        settings=MECH_MEASURE_SETTINGS,
        config=mech_configfile,
        python=python_arg,
    log:
        f"{MECH}/logs/reference.log",
    threads: 1
    shell:
        "{params.python} -m hdpo mechanism reference --config {params.config:q} --data {MECH}/data"
        " --model-cache results/models --out {output:q} --threads {threads} > {log:q} 2>&1"


rule mechanism_measure_base:
    input:
        reference=f"{MECH}/reference.jsonl",
    output:
        f"{MECH}/measure/base.jsonl",
    params:
        settings=MECH_MEASURE_SETTINGS,
        config=mech_configfile,
        python=python_arg,
    log:
        f"{MECH}/logs/measure/base.log",
    threads: 1
    shell:
        "{params.python} -m hdpo mechanism measure --base --config {params.config:q} --data {MECH}/data"
        " --reference {input.reference:q} --model-cache results/models --out {output:q} --threads {threads}"
        " > {log:q} 2>&1"


rule mechanism_measure:
    input:
        reference=f"{MECH}/reference.jsonl",
        policy=f"{MECH}/runs/{MECH_RUN}/policy_final",
    output:
        f"{MECH}/measure/{MECH_RUN}.jsonl",
    params:
        settings=MECH_MEASURE_SETTINGS,
        config=mech_configfile,
        python=python_arg,
    log:
        f"{MECH}/logs/measure/{MECH_RUN}.log",
    threads: 1
    shell:
        "{params.python} -m hdpo mechanism measure --model {input.policy:q} --config {params.config:q}"
        " --data {MECH}/data --reference {input.reference:q} --model-cache results/models --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


rule mechanism:
    localrule: True
    input:
        measures=[f"{MECH}/measure/{r}.jsonl" for r in ["base", *MECH_RUNS]],
        runs=[f"{MECH}/runs/{r}/{f}" for r in MECH_RUNS for f in ("metrics.jsonl", "cliffs.jsonl")],
        code=[str(REPO / "hdpo" / f) for f in ("mechanism.py", "report/mechanism.py")],
    output:
        f"{MECH}/outcomes.csv",
        f"{MECH}/outcomes.md",
        f"{MECH}/per_problem.csv",
        report("figures/mechanism.png", caption="../report/mechanism.rst", category="Mechanism"),
        "figures/mechanism.pdf",
    params:
        config=mech_configfile,
        python=python_arg,
    log:
        f"{MECH}/logs/report.log",
    shell:
        "{params.python} -m hdpo mechanism report --config {params.config:q} --data {MECH}/data"
        " --results {MECH} --figures figures > {log:q} 2>&1"
