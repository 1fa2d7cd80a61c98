# Tables and figures read only aggregated files (metrics.jsonl, cliffs.jsonl, val_problems.jsonl.gz, summary.json,
# eval JSONs and their per-problem samples), never checkpoints, so they regenerate in seconds. Each rule lists as
# inputs the code files it imports (CODE in common.smk): editing hdpo/report/tables.py reruns the tables only,
# hdpo/report/figures.py or the style file the figures only, the shared modules both; nothing upstream reruns.
# Every table CSV and figure PNG is wrapped in report() with a caption: `snakemake --report report.zip` (after a
# run) is the shareable result.
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


rule tables:
    input:
        results=REPORT_INPUTS,
        code=CODE["tables"],
    output:
        _reported(TABLES, "tables"),
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
        code=CODE["figures"],
    output:
        _reported(FIGURES, "figures"),
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
