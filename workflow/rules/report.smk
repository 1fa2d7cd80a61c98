# Tables and figures read only aggregated files (metrics.jsonl, cliffs.jsonl, val_problems.jsonl.gz, summary.json,
# eval JSONs and their per-problem samples), never checkpoints, so they regenerate in seconds. Each rule lists as
# inputs the code files it imports (CODE in common.smk): editing hdpo/report/tables.py reruns the tables only,
# hdpo/report/figures.py or the style file the figures only, the shared modules both; nothing upstream reruns.
# Every table CSV and figure PNG is wrapped in report() with a caption: `snakemake --report report.zip` (after a
# run) is the shareable result.


rule tables:
    input:
        results=GRID.report_inputs(),
        code=CODE["tables"],
    output:
        _reported(TABLES, "tables"),
    params:
        settings=SETTINGS.report(),
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
        results=GRID.report_inputs(),
        code=CODE["figures"],
    output:
        _reported(FIGURES, "figures"),
    params:
        settings=SETTINGS.report(),
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
