# evaluate: one checkpoint (final | best) of one run on one benchmark (pass@k from n samples, greedy accuracy);
# a best policy with the final one's files copies the final's result (reuse_input).
rule evaluate:
    input:
        model=policy_dir("{run}", "{ckpt}"),
        data=f"{DATA_DIR}/benchmarks/{{bench}}.jsonl",
        reuse=reuse_input,
    output:
        result=eval_result("{run}", "{ckpt}", "{bench}"),
        samples=eval_samples(eval_result("{run}", "{ckpt}", "{bench}")),
    params:
        settings=lambda wildcards: SETTINGS.evaluate(GRID.method_of(wildcards.run), wildcards.bench),
        config=configfile_arg,
        method=method_arg,
        reuse=reuse_arg,
        python=python_arg,
        snakemake_pid=snakemake_pid,
        data=lambda wildcards, input: os.path.dirname(os.path.dirname(input.data)),
    log:
        "results/logs/evaluate/{run}/{ckpt}/{bench}.log",
    benchmark:
        "results/benchmarks/evaluate/{run}/{ckpt}/{bench}.tsv"
    conda:
        CONDA_ENV
    threads: resource("evaluate", "threads")
    resources:
        gpu=resource("evaluate", "gpu"),
        gpu_jobs=gpu_job_token("evaluate"),
        mem_mb=resource("evaluate", "mem_mb"),
        runtime=resource("evaluate", "runtime"),
    shell:
        "{params.python} -m hdpo evaluate --config {params.config:q} --model {input.model:q} --method {params.method}"
        " --benchmark {wildcards.bench}"
        " --data {params.data:q} --out {output.result:q} --threads {threads} {params.reuse}"
        " --stop-with {params.snakemake_pid} > {log:q} 2>&1"


# evaluate_base: the untrained model (step 0) on one benchmark, a row of its own in the benchmark tables.
rule evaluate_base:
    input:
        data=f"{DATA_DIR}/benchmarks/{{bench}}.jsonl",
    output:
        result=base_eval_result("{bench}"),
        samples=eval_samples(base_eval_result("{bench}")),
    params:
        settings=lambda wildcards: SETTINGS.base_evaluate(wildcards.bench),
        config=configfile_arg,
        python=python_arg,
        snakemake_pid=snakemake_pid,
        data=lambda wildcards, input: os.path.dirname(os.path.dirname(input.data)),
    log:
        "results/logs/evaluate/base/{bench}.log",
    benchmark:
        "results/benchmarks/evaluate/base/{bench}.tsv"
    conda:
        CONDA_ENV
    threads: resource("evaluate", "threads")
    resources:
        gpu=resource("evaluate", "gpu"),
        gpu_jobs=gpu_job_token("evaluate"),
        mem_mb=resource("evaluate", "mem_mb"),
        runtime=resource("evaluate", "runtime"),
    shell:
        "{params.python} -m hdpo evaluate --config {params.config:q} --base --benchmark {wildcards.bench}"
        " --data {params.data:q} --out {output.result:q} --threads {threads}"
        " --stop-with {params.snakemake_pid} > {log:q} 2>&1"
