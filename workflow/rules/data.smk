# prepare_data: the 95/5 train/validation split and one file per benchmark.
rule prepare_data:
    output:
        train=f"{DATA_DIR}/train.jsonl",
        val=f"{DATA_DIR}/val.jsonl",
        summary=f"{DATA_DIR}/summary.json",
        benchmarks=[f"{DATA_DIR}/benchmarks/{b}.jsonl" for b in GRID.benchmarks],
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
        "{params.python} -m hdpo prepare-data --config {params.config:q} --out {params.out:q} > {log:q} 2>&1"
