# train: one run = one method x one seed (Algorithm 1; validation every eval.val_period steps inside).
# Its inputs are the split files alone (benchmarks have jobs of their own), so a new or edited benchmark never
# retrains; a changed data config rewrites the split and retrains.
# Resumable checkpoints go to params.work_dir (results/checkpoints/<run>/<settings digest>), which is not an
# output: Snakemake deletes a job's outputs before it starts, and `--resume` continues from the last
# checkpoint there (a killed or timed-out job continues its trajectory when rerun).
rule train:
    input:
        train=f"{DATA_DIR}/train.jsonl",
        val=f"{DATA_DIR}/val.jsonl",
    output:
        metrics=f"{run_dir(RUN)}/metrics.jsonl",
        summary=f"{run_dir(RUN)}/summary.json",
        cliffs=f"{run_dir(RUN)}/cliffs.jsonl",
        val_problems=f"{run_dir(RUN)}/val_problems.jsonl.gz",
        config=f"{run_dir(RUN)}/config.yaml",
        final=directory(policy_dir(RUN, "final")),
        best=directory(policy_dir(RUN, "best")),
    params:
        settings=lambda wildcards: SETTINGS.train(wildcards.method),
        config=configfile_arg,
        launcher=train_launcher,
        data=lambda wildcards, input: os.path.dirname(input.train),
        run_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        work_dir=work_dir,
        snakemake_pid=snakemake_pid,
    log:
        f"results/logs/train/{RUN}.log",
    benchmark:
        f"results/benchmarks/train/{RUN}.tsv"
    conda:
        CONDA_ENV
    threads: resource("train", "threads")
    resources:
        gpu=resource("train", "gpu"),
        gpu_jobs=gpu_job_token("train"),
        mem_mb=resource("train", "mem_mb"),
        runtime=resource("train", "runtime"),
    shell:
        "{params.launcher} train --config {params.config:q} --method {wildcards.method} --seed {wildcards.seed}"
        " --data {params.data:q} --run-dir {params.run_dir:q} --work-dir {params.work_dir:q} --resume"
        " --threads {threads} --stop-with {params.snakemake_pid}"
        " > {log:q} 2>&1"
