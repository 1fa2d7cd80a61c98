"""The model card of a published policy: README.md in the Hugging Face format (YAML front matter, then markdown)
saying what produced the weights (method, lambda, teacher, seed, training steps, base model, config digest) and
how they score: validation at the policy's step and, where evaluated (`hdpo export --results`), benchmarks,
each with its 95% t interval over problems (hdpo.stats.mean_interval, as the report's tables)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import yaml

from hdpo.config import Config, iter_keys
from hdpo.io import atomic_write_text, read_jsonl, samples_path
from hdpo.passk import pass_at_k
from hdpo.stats import Interval, format_interval, mean_interval

# What makes the weights: the method and the sections training reads to update them. Left out: the seed (stated
# apart), validation and evaluation settings (an evaluation may sample differently from the same weights),
# checkpointing, benchmarks, the grid, job sizes and trackers, and every runtime-only key.
IN_DIGEST = ("model", "data", "grpo", "hdpo", "optimizer", "generation")


def config_digest(cfg: Config) -> str:
    """sha256 (first 12 hex) of the settings that made a policy's weights (its method and the training sections,
    less runtime-only keys): policies with the same digest were trained the same way, up to their seed. GRPO
    (distill weight 0) reads no other `hdpo` key, as the workflow's rerun settings."""
    full = cfg.to_dict()
    data = {k: full[k] for k in IN_DIGEST}
    data["method"] = full["run"]["method"]
    if cfg.hdpo.distill_weight == 0:
        data["hdpo"] = {"distill_weight": 0}
    for key in iter_keys():
        if key.runtime:
            section, _, name = key.key.partition(".")
            if isinstance(data.get(section), dict):
                data[section].pop(name, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _intervals(counts: list[int], greedy: list, n: int, ks: list[int]) -> dict[str, Interval]:
    out = {f"pass@{k}": mean_interval([[pass_at_k(n, c, k) for c in counts]], bounds=(0.0, 1.0))
           for k in ks if k <= n and counts}
    given = [g for g in greedy if g is not None]
    if given:
        out["greedy_acc"] = mean_interval([given], bounds=(0.0, 1.0))
    return out


def validation_numbers(records: list[dict], step: int, ks: list[int]) -> dict[str, Interval]:
    """From val_problems records (hdpo.train): the validation at `step` (not the cliff probe's records)."""
    for rec in records:
        if rec["step"] == step and "set" not in rec:
            return _intervals(rec["num_correct"], rec.get("greedy", []), rec["num_samples"], ks)
    return {}


def benchmark_numbers(results: list[Path], ks: list[int]) -> dict[str, dict[str, Interval]]:
    """From `hdpo evaluate` results (the summary JSON and its per-problem samples file beside it)."""
    out = {}
    for path in map(Path, results):
        result = json.loads(path.read_text())
        rows = read_jsonl(samples_path(path))
        out[result["benchmark"]] = _intervals([r["num_correct"] for r in rows],
                                              [r.get("greedy", {}).get("reward") for r in rows],
                                              result["num_samples"], ks)
    return out


def render(cfg: Config, meta: dict, validation: dict[str, Interval],
           benchmarks: Optional[dict[str, dict[str, Interval]]] = None) -> str:
    h, hdpo_on = cfg.hdpo, cfg.hdpo.distill_weight > 0
    digest = config_digest(cfg)
    name = f"{meta.get('run', cfg.run.method)} ({meta.get('checkpoint', 'policy')})"
    results = [{"task": {"type": "text-generation"}, "dataset": {"name": bench, "type": bench},
                "metrics": [{"type": metric, "name": f"{metric} [{iv.low:.3f}, {iv.high:.3f}]",
                             "value": round(iv.estimate, 4)} for metric, iv in numbers.items()]}
               for bench, numbers in {"validation": validation, **(benchmarks or {})}.items() if numbers]
    front = {"base_model": cfg.model.name, "library_name": "transformers", "pipeline_tag": "text-generation",
             "license": "apache-2.0", "tags": ["hdpo" if hdpo_on else "grpo", "reinforcement-learning", "math"],
             "model-index": [{"name": name, "results": results}]}
    method = (f"HDPO ({cfg.run.label or cfg.run.method}): GRPO + λ·JSD toward the {h.teacher} privileged "
              f"teacher" if hdpo_on else f"GRPO ({cfg.run.label or cfg.run.method})")
    rows = [("method", cfg.run.method), ("lambda (hdpo.distill_weight)", h.distill_weight),
            ("teacher", h.teacher if hdpo_on else "none (GRPO)"), ("seed", cfg.seed),
            ("checkpoint", meta.get("checkpoint")), ("training step of these weights", meta.get("model_step")),
            ("training steps of the run", cfg.grpo.max_num_steps), ("base model", cfg.model.name),
            ("training dtype", cfg.model.dtype), ("config digest", digest)]
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {name}", "", f"{method}, trained with the `hdpo` package (a replication of HDPO, Hybrid "
             "Distillation Policy Optimization via Privileged Self-Distillation).", "",
             "| setting | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
             "The config digest is the sha256 of the run's resolved config (config.yaml beside the run) without "
             "the keys that change no result; policies with the same digest were trained under the same "
             "settings.", ""]
    lines += ["## Results", "",
              f"Each number with its 95% interval over problems; {cfg.eval.num_samples} samples per problem at "
              f"temperature {cfg.eval.temperature} (unbiased pass@k), greedy accuracy from one greedy answer.", ""]
    for bench, numbers in {"validation": validation, **(benchmarks or {})}.items():
        if numbers:
            lines += [f"| {bench} | " + " | ".join(numbers) + " |", "| --- |" + " ---: |" * len(numbers),
                      f"| {numbers[next(iter(numbers))].n_problems} problems | "
                      + " | ".join(format_interval(iv) for iv in numbers.values()) + " |", ""]
    if not benchmarks:
        lines += ["Benchmarks: not evaluated when this card was written (`hdpo export --results` adds them).", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, cfg: Config, meta: dict, validation: dict[str, Interval],
                     benchmarks: Optional[dict[str, dict[str, Interval]]] = None) -> Path:
    path = Path(folder) / "README.md"
    atomic_write_text(path, render(cfg, meta, validation, benchmarks))
    return path


def read_front_matter(path: str | Path) -> dict:
    """The YAML block of a model card (what the Hub reads)."""
    text = Path(path).read_text()
    _, front, _ = text.split("---\n", 2)
    return yaml.safe_load(front)
