# Tables and figures read only aggregated files (metrics.jsonl, summary.json, eval JSONs), never checkpoints,
# so they regenerate in seconds. Their code files are inputs: editing hdpo/report.py or hdpo/paper.py reruns
# tables and figures, editing the style file reruns figures only; nothing upstream reruns.
REPORT_INPUTS = [f for run in RUNS for f in run_files(run) + eval_files(run)]


rule tables:
    input:
        results=REPORT_INPUTS,
        code=[CODE["report.py"], CODE["paper.py"]],
    output:
        TABLES,
    params:
        settings=report_settings(),
        config=configfile_arg,
        python=python_arg,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        "results/logs/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    conda:
        CONDA_ENV
    localrule: True
    threads: resource("report", "threads")
    resources:
        gpu=resource("report", "gpu"),
        mem_mb=resource("report", "mem_mb"),
        runtime=resource("report", "runtime"),
    shell:
        "{params.python} -m hdpo report tables --config {params.config:q} --results results --out {params.out:q}"
        " > {log:q} 2>&1"


rule figures:
    input:
        results=REPORT_INPUTS,
        table="results/tables/table1.csv",  # the DAG runs tables -> figures: a broken table stops first
        code=[CODE["report.py"], CODE["paper.py"], CODE["plot_style.mplstyle"]],
    output:
        FIGURES,
    params:
        settings=report_settings(),
        config=configfile_arg,
        python=python_arg,
        out=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        "results/logs/figures.log",
    benchmark:
        "results/benchmarks/figures.tsv"
    conda:
        CONDA_ENV
    localrule: True
    threads: resource("report", "threads")
    resources:
        gpu=resource("report", "gpu"),
        mem_mb=resource("report", "mem_mb"),
        runtime=resource("report", "runtime"),
    shell:
        "{params.python} -m hdpo report figures --config {params.config:q} --results results --out {params.out:q}"
        " > {log:q} 2>&1"
