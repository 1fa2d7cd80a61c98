# prepare_data: the 95/5 train/validation split; prepare_benchmark: one file per benchmark.
# One job per part, each rerun by its own settings only: a benchmark added or edited rewrites that benchmark's
# file alone, so no input of training changes and nothing downstream needs `ancient()` (which, with a rerun
# upstream, makes Snakemake 9 drop a job whose output is missing: snakemake/snakemake#4166).
rule prepare_data:
    output:
        train=f"{DATA_DIR}/train.jsonl",
        val=f"{DATA_DIR}/val.jsonl",
        summary=f"{DATA_DIR}/summary.json",
    params:
        settings=SETTINGS.data(),
        config=configfile_arg,
        python=python_arg,
        out=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        "results/logs/prepare_data.log",
    benchmark:
        "results/benchmarks/prepare_data.tsv"
    conda:
        CONDA_ENV
    threads: resource("prepare_data", "threads")
    resources:
        gpu=resource("prepare_data", "gpu"),
        mem_mb=resource("prepare_data", "mem_mb"),
        runtime=resource("prepare_data", "runtime"),
    shell:
        "{params.python} -m hdpo prepare-data --config {params.config:q} --out {params.out:q} --splits > {log:q} 2>&1"


rule prepare_benchmark:
    output:
        f"{DATA_DIR}/benchmarks/{{bench}}.jsonl",
    params:
        settings=lambda wildcards: SETTINGS.benchmark(wildcards.bench),
        config=configfile_arg,
        python=python_arg,
        out=lambda wildcards, output: os.path.dirname(os.path.dirname(output[0])),
    log:
        "results/logs/prepare_benchmark/{bench}.log",
    benchmark:
        "results/benchmarks/prepare_benchmark/{bench}.tsv"
    conda:
        CONDA_ENV
    threads: resource("prepare_data", "threads")
    resources:
        gpu=resource("prepare_data", "gpu"),
        mem_mb=resource("prepare_data", "mem_mb"),
        runtime=resource("prepare_data", "runtime"),
    shell:
        "{params.python} -m hdpo prepare-data --config {params.config:q} --out {params.out:q}"
        " --benchmark {wildcards.bench} > {log:q} 2>&1"
