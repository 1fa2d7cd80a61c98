"""Synthetic result files with per-problem records and known effects, as the trainer and `hdpo evaluate` write
them: metrics.jsonl, val_problems.jsonl.gz, cliffs.jsonl, eval JSON + samples. Used by the report tests and to
look at the figures without training anything."""
from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import numpy as np

from hdpo.config import from_dict, paper_methods

METHODS = ["grpo", "hdpo_frozen_lambda0.1", "hdpo_drifting_lambda0.1", "hdpo_drifting_lambda0.01"]
EFFECT = {"grpo": 0.0, "hdpo_frozen_lambda0.1": 0.15, "hdpo_drifting_lambda0.1": 0.10, "hdpo_drifting_lambda0.01": 0.0}


def config(methods=METHODS, seeds=(1, 2), benchmarks=("math500",), n_samples=8, greedy=True,
           best_includes_step0=False):
    return from_dict({"eval": {"pass_k": [1, 2, 4, 8], "num_samples": n_samples, "greedy": greedy,
                               "best_includes_step0": best_includes_step0},
                      "grpo": {"num_prompts_per_step": 4, "num_generations_per_prompt": 4, "max_num_steps": 40},
                      "experiment": {"methods": paper_methods(*methods), "seeds": list(seeds), "benchmarks": list(benchmarks),
                                     "checkpoints": ["final", "best"]}})


def _gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def write_run(results: Path, method: str, seed: int, n_problems: int = 60, steps: int = 40, val_period: int = 10,
              n: int = 8, base_p: np.ndarray | None = None) -> dict:
    """A run whose per-problem success probability rises with the step by EFFECT[method] at the end; returns
    the per-step correct counts {step: [counts]} it wrote."""
    rng = np.random.default_rng([seed, zlib.crc32(method.encode())])  # hash() of a str changes per process
    base_p = base_p if base_p is not None else np.linspace(0.02, 0.9, n_problems)
    ids = [f"p{i:03d}" for i in range(n_problems)]
    hdpo = paper_methods(method)[method]["distill_weight"] > 0
    run = results / "runs" / f"{method}_seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    metrics, records, ledger, counts = [], [], [], {}
    for step in range(steps + 1):
        if step % val_period == 0 or step == steps:
            p = np.clip(base_p + (0.05 + EFFECT[method]) * step / steps if step else base_p, 0, 1)
            c = rng.binomial(n, p) if step else np.random.default_rng(7).binomial(n, base_p)  # step 0: one model
            g = (rng.random(n_problems) < p).astype(float) if step else \
                (np.random.default_rng(8).random(n_problems) < base_p).astype(float)
            counts[step] = c.tolist()
            records.append({"step": step, "num_samples": n, "ids": ids, "num_correct": c.tolist(),
                            "greedy": g.tolist()})
            from hdpo.passk import mean_pass_at_k
            if step:  # the cliff probe: 10 former cliffs, solved more often with the effect
                pc = rng.binomial(n, np.clip(0.05 + 2 * EFFECT[method] * step / steps, 0, 1), size=10)
                records.append({"step": step, "set": "cliff_probe", "num_samples": n, "ids": [f"t{i}" for i in range(10)],
                                "indices": list(range(10)), "cliff_steps": [1] * 10, "num_correct": pc.tolist()})
            res = mean_pass_at_k(c.tolist(), n, [k for k in (1, 2, 4, 8) if k <= n])
            metrics.append({"kind": "val", "step": step, **{f"val/{k}": v for k, v in res.items()},
                            "val/greedy_acc": float(g.mean()), "val/num_problems": n_problems, "val/num_samples": n})
        if step < steps:
            rows = []
            for j in range(4):
                idx = int((step * 4 + j) % 30) if step < 20 else int(rng.integers(0, 30))
                r = (rng.random(4) < 0.3 + 0.4 * step / steps).astype(float).tolist()
                cliff = sum(r) == 0
                gen = 4 if (hdpo and cliff) else 0
                kept = int(rng.integers(0, 5)) if gen else 0
                tail = {"mean": float(rng.uniform(0, 0.05)), "p50": 0.01, "p90": 0.04, "max": 0.2, "tokens": 50} \
                    if kept else None
                rows.append({"step": step + 1, "index": idx, "id": f"t{idx}", "rewards": r, "cliff": cliff,
                             "selected": cliff, "privileged_generated": gen, "privileged_kept": kept,
                             "distilled": kept > 0, "reinjected_from": None, "teacher_tail_mass": tail})
            ledger += rows
            n_cliff = sum(r["cliff"] for r in rows)
            gen_all = sum(r["privileged_generated"] for r in rows)
            kept_all = sum(r["privileged_kept"] for r in rows)
            metrics.append({"kind": "train", "step": step + 1, "loss/total": 0.1, "loss/grpo": float(rng.normal(0, .01)),
                            "loss/jsd": 0.3 * np.exp(-step / 20) if hdpo and kept_all else 0.0,
                            "reward/mean": float(np.mean([sum(r["rewards"]) / 4 for r in rows])),
                            "cliffs": n_cliff, "cliff_fraction": n_cliff / 4, "privileged/generated": gen_all,
                            "privileged/kept": kept_all, "teacher_pass_rate": kept_all / gen_all if gen_all else None,
                            "tokens/grpo": int(16 * (60 - 20 * step / steps)), "tokens/distill": 10,
                            "logprob/sampler_vs_trainer_abs_diff": float(rng.uniform(0, 1e-3)),
                            "time/rollout": 5.0, "time/reward": 0.5, "time/privileged": 2.0 if hdpo else 0.0,
                            "time/teacher": 0.5 if hdpo else 0.0, "time/update": 3.0, "time/step": 11.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run / "cliffs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ledger))
    _gz(run / "val_problems.jsonl.gz", records)
    (run / "summary.json").write_text(json.dumps({"run": run.name, "steps": steps}))
    return counts


def write_eval(results: Path, run: str, ckpt: str, bench: str, p: np.ndarray, step: int, seed: int, n: int = 8) -> None:
    rng = np.random.default_rng([seed, step, len(ckpt)])
    c = rng.binomial(n, p)
    g = (rng.random(len(p)) < p).astype(float)
    from hdpo.passk import mean_pass_at_k
    recs = [{"id": f"m{i}", "answer": "1", "num_correct": int(ci), "greedy": {"reward": float(gi)},
             "samples": [{}] * n} for i, (ci, gi) in enumerate(zip(c, g))]
    out = results / "eval" / run / (ckpt if run != "base" else "") / f"{bench}.json"
    out = results / "eval" / "base" / f"{bench}.json" if run == "base" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "checkpoint": ckpt, "model_step": step, "benchmark": bench,
                               "num_problems": len(p), "num_samples": n, **mean_pass_at_k(c.tolist(), n, [1, 2, 4, 8]),
                               "greedy_acc": float(g.mean())}))
    _gz(out.with_name(out.stem + ".samples.jsonl.gz"), recs)


def write_all(results: Path, cfg, n_problems: int = 60, bench_problems: int = 20) -> dict:
    counts = {}
    for m in cfg.experiment.methods:
        for s in cfg.experiment.seeds:
            counts[(m, s)] = write_run(results, m, s, n_problems)
            for ckpt in cfg.experiment.checkpoints:
                # the GRPO "best" checkpoint is the untrained model: the tables must say so
                step = 0 if (m == "grpo" and ckpt == "best") else 40
                p = np.linspace(0.0, 0.5, bench_problems) + (0 if step == 0 else EFFECT[m])
                for b in cfg.experiment.benchmarks:
                    write_eval(results, f"{m}_seed{s}", ckpt, b, np.clip(p, 0, 1), step, s)
    for b in cfg.experiment.benchmarks:
        write_eval(results, "base", "base", b, np.linspace(0.0, 0.5, bench_problems), 0, 0)
    return counts


if __name__ == "__main__":  # python tests/synthetic_results.py OUT: results and figures to look at
    import sys

    from hdpo.report.figures import write_figures
    from hdpo.report.tables import write_tables

    out = Path(sys.argv[1])
    cfg = config()
    write_all(out / "results", cfg)
    write_tables(cfg, out / "results", out / "tables")
    write_figures(cfg, out / "results", out / "figures")
