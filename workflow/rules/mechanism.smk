# The mechanism experiment (issue 23): `snakemake --cores all mechanism`.
# Its own config, config/mechanism.yaml layered over config/config.yaml whatever --configfile says, and its own
# files under results/mechanism/ (data, runs, checkpoints, measurements), so it never touches the main grid:
#   mechanism_data -> mechanism_train(method, seed) -> mechanism_measure(run) -+-> mechanism (table + figure)
#   mechanism_reference (the untrained model's privileged responses) --------+
# Reruns follow the same settings as the main grid's jobs (hdpo.workflow.Settings of this config).
try:
    MECH_CFG, MECH_RAW = plan.mechanism_config(DEFAULT_CONFIGFILE, MECHANISM_CONFIGFILE)
except ConfigError as err:
    raise WorkflowError(f"config/mechanism.yaml: {err}") from None
MECH = "results/mechanism"
MECH_CONFIGFILE = plan.write_merged_config(MECH_CFG)
MECH_SETTINGS = plan.Settings(MECH_CFG, MECH_RAW)
MECH_MEASURE_SETTINGS = plan.measurement_settings(MECH_CFG, MECH_RAW)
MECH_METHODS = list(MECH_CFG.experiment.methods)
MECH_RUNS = [f"{m}_seed{s}" for m in MECH_METHODS for s in MECH_CFG.experiment.seeds]
MECH_RUN = "{mmethod}_seed{mseed}"


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
        config=lambda wildcards, input: MECH_CONFIGFILE,
        python=python_arg,
        out=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{MECH}/logs/data.log",
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "{params.python} -m hdpo prepare-data --config {params.config:q} --out {params.out:q} --splits > {log:q} 2>&1"


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
        config=lambda wildcards, input: MECH_CONFIGFILE,
        python=python_arg,
        data=lambda wildcards, input: os.path.dirname(input.train),
        run_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        work_dir=lambda wildcards, input: MECH_SETTINGS.work_dir(wildcards.mmethod, wildcards.mseed),
        snakemake_pid=snakemake_pid,
    log:
        f"{MECH}/logs/train/{MECH_RUN}.log",
    benchmark:
        f"{MECH}/benchmarks/train/{MECH_RUN}.tsv"
    conda:
        CONDA_ENV
    threads: plan.rule_resource(MECH_RAW, "train", "threads")
    resources:
        mem_mb=plan.rule_resource(MECH_RAW, "train", "mem_mb"),
        runtime=plan.rule_resource(MECH_RAW, "train", "runtime"),
    shell:
        "{params.python} -m hdpo train --config {params.config:q} --method {wildcards.mmethod}"
        " --seed {wildcards.mseed} --data {params.data:q} --run-dir {params.run_dir:q}"
        " --work-dir {params.work_dir:q} --model-cache results/models --resume --threads {threads}"
        " --stop-with {params.snakemake_pid} > {log:q} 2>&1"


rule mechanism_reference:
    input:
        train=f"{MECH}/data/train.jsonl",
    output:
        f"{MECH}/reference.jsonl",
    params:
        settings=MECH_MEASURE_SETTINGS,
        config=lambda wildcards, input: MECH_CONFIGFILE,
        python=python_arg,
        data=lambda wildcards, input: os.path.dirname(input.train),
    log:
        f"{MECH}/logs/reference.log",
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "{params.python} -m hdpo mechanism reference --config {params.config:q} --data {params.data:q}"
        " --model-cache results/models --out {output:q} --threads {threads} > {log:q} 2>&1"


rule mechanism_measure_base:
    input:
        train=f"{MECH}/data/train.jsonl",
        reference=f"{MECH}/reference.jsonl",
    output:
        f"{MECH}/measure/base.jsonl",
    params:
        settings=MECH_MEASURE_SETTINGS,
        config=lambda wildcards, input: MECH_CONFIGFILE,
        python=python_arg,
        data=lambda wildcards, input: os.path.dirname(input.train),
    log:
        f"{MECH}/logs/measure/base.log",
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "{params.python} -m hdpo mechanism measure --base --config {params.config:q} --data {params.data:q}"
        " --reference {input.reference:q} --model-cache results/models --out {output:q} --threads {threads}"
        " > {log:q} 2>&1"


rule mechanism_measure:
    input:
        train=f"{MECH}/data/train.jsonl",
        reference=f"{MECH}/reference.jsonl",
        policy=f"{MECH}/runs/{MECH_RUN}/policy_final",
    output:
        f"{MECH}/measure/{MECH_RUN}.jsonl",
    params:
        settings=MECH_MEASURE_SETTINGS,
        config=lambda wildcards, input: MECH_CONFIGFILE,
        python=python_arg,
        data=lambda wildcards, input: os.path.dirname(input.train),
    log:
        f"{MECH}/logs/measure/{MECH_RUN}.log",
    conda:
        CONDA_ENV
    threads: 1
    shell:
        "{params.python} -m hdpo mechanism measure --model {input.policy:q} --config {params.config:q}"
        " --data {params.data:q} --reference {input.reference:q} --model-cache results/models --out {output:q}"
        " --threads {threads} > {log:q} 2>&1"


rule mechanism:
    localrule: True
    input:
        train=f"{MECH}/data/train.jsonl",
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
        config=lambda wildcards, input: MECH_CONFIGFILE,
        python=python_arg,
        data=lambda wildcards, input: os.path.dirname(input.train),
        root=lambda wildcards, output: os.path.dirname(output[0]),
        figures=lambda wildcards, output: os.path.dirname(output[3]),
    log:
        f"{MECH}/logs/report.log",
    conda:
        CONDA_ENV
    shell:
        "{params.python} -m hdpo mechanism report --config {params.config:q} --data {params.data:q}"
        " --results {params.root:q} --figures {params.figures:q} > {log:q} 2>&1"
