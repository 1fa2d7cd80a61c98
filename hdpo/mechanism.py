"""The mechanism experiment (config/mechanism.yaml, `snakemake --cores all mechanism`): does HDPO's distillation
move the plain-prompt student where GRPO has no gradient?

On a cliff (all K rollouts wrong) GRPO's advantages are all zero. HDPO samples the same prompt with privileged
information, keeps the correct responses and pulls the plain-prompt student toward the (privileged) teacher on
them. Three outcomes, fixed before any run, each measured on every problem of the training pool after training
and compared with the GRPO runs of the same seeds (the control):

  (a) on the distilled cliffs: the plain-prompt log-likelihood per token of correct privileged responses, and the
      JSD (top-k, as in the loss) between the plain-prompt student and the privileged teacher on them, each as a
      change from the untrained model. The responses are fixed: drawn once from the untrained model with the
      privileged prompt and kept when math-verify scores them correct (`draw_references`), so every policy is
      measured on the same tokens. The teacher is the measured policy itself on the privileged prompt (the
      drifting teacher's view of it).
  (b) on the distilled cliffs: the plain-prompt solve rate at the end, HDPO - GRPO, paired by problem and seed.
  (c) on the prompts that were never a cliff: the plain-prompt solve rate of each method (does distillation
      cost anything there?).

"Distilled cliffs" are the problems HDPO distilled at least once in every seed (its cliff ledgers), so each
outcome is a [seeds, problems] matrix and its interval comes from hdpo.stats' crossed model (seeds and
problems random). Measuring (`measure_policy`) is the I/O edge; `outcomes` and `per_problem` are pure.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from hdpo.config import Config
from hdpo.data import Problem, build_messages, render_prompt
from hdpo.generation import Sampling, problem_seed
from hdpo.logprobs import chunked_token_logprobs, chunked_topk, chunked_topk_jsd, output_projection
from hdpo.stats import Interval, mean_interval, paired_difference

log = logging.getLogger(__name__)

REFERENCE_STREAM = "mechanism/reference"  # seed streams of the two samplings (hdpo.generation.problem_seed)
SOLVE_STREAM = "mechanism/solve"


def _sampling(cfg: Config) -> Sampling:
    g = cfg.generation
    return Sampling(g.temperature, g.top_p, g.max_new_tokens or cfg.model.max_total_sequence_length)


def _engine(cfg: Config, model_name: str):
    from hdpo.generators import make_generator
    from hdpo.models import load_model, load_tokenizer

    tok = load_tokenizer(model_name)
    model = load_model(model_name, cfg.model.dtype)
    gen = make_generator(cfg.generation.backend, model, tok, cfg.generation.batch_size,
                         cfg.model.max_total_sequence_length, cfg.generation.gpu_memory_utilization,
                         cpu_kv_cache_gib=cfg.generation.vllm_cpu_kv_cache_gib)
    return tok, model, gen


def _scorer(cfg: Config):
    from hdpo.reward import RewardScorer

    return RewardScorer(cfg.eval.reward_workers, cfg.eval.reward_timeout_s,
                        retry_timeout_s=cfg.eval.reward_retry_timeout_s)


def draw_references(cfg: Config, problems: list[Problem], model_name: str) -> list[dict]:
    """Per problem: `mechanism.reference_samples` privileged responses of the untrained model, and the correct
    ones (at most `mechanism.max_references`) as token ids and text."""
    m = cfg.mechanism
    tok, _, gen = _engine(cfg, model_name)
    prompts = [render_prompt(tok, build_messages(p, cfg.data.system_prompt, cfg.hdpo.privileged_info))
               for p in problems]
    seeds = [problem_seed(m.seed, REFERENCE_STREAM, p.id) for p in problems]
    groups = gen.generate(prompts, m.reference_samples, _sampling(cfg), seeds)
    with _scorer(cfg) as scorer:
        rewards = scorer.score([r.text for g in groups for r in g],
                               [p.answer for p in problems for _ in range(m.reference_samples)])
    rows = []
    for i, (p, group) in enumerate(zip(problems, groups)):
        mine = rewards[i * m.reference_samples:(i + 1) * m.reference_samples]
        kept = [r for r, x in zip(group, mine) if x >= cfg.hdpo.teacher_min_reward]
        rows.append({"id": p.id, "drawn": len(group), "correct": len(kept),
                     "references": [{"text": r.text, "response_ids": list(r.response_ids)}
                                    for r in kept[:m.max_references]]})
    log.info("reference responses: %d of %d problems have at least one correct privileged response (%d kept)",
             sum(r["correct"] > 0 for r in rows), len(rows), sum(len(r["references"]) for r in rows))
    return rows


@torch.no_grad()
def reference_scores(model, micro, plain: list[list[int]], privileged: list[list[int]], responses: list[list[int]],
                     k: int, temperature: float) -> tuple[list[float], list[float]]:
    """Per response: the mean over its tokens of the plain-prompt log-probability, and of the top-k JSD between
    the plain-prompt model and the same model on the privileged prompt (the loss's JSD, hdpo.losses.topk_jsd)."""
    weight, bias = output_projection(model)
    logp: list[float] = [math.nan] * len(responses)
    jsd: list[float] = [math.nan] * len(responses)
    for mb in micro.plan(list(zip(plain, responses))):
        h_student, targets = micro.hidden(model, [plain[i] for i in mb], [responses[i] for i in mb])
        h_teacher, _ = micro.hidden(model, [privileged[i] for i in mb], [responses[i] for i in mb])
        lp = chunked_token_logprobs(h_student, weight, bias, targets[:, None], temperature, micro.chunk)[:, 0]
        vals, ids = chunked_topk(h_teacher, weight, bias, k, temperature, micro.chunk)
        js = chunked_topk_jsd(h_student, weight, bias, ids, vals, temperature, micro.chunk)
        for i, a, b in zip(mb, lp.split([len(responses[i]) for i in mb]), js.split([len(responses[i]) for i in mb])):
            logp[i], jsd[i] = float(a.double().mean()), float(b.double().mean())
    return logp, jsd


def measure_policy(cfg: Config, problems: list[Problem], references: list[dict], model_name: str) -> list[dict]:
    """Per problem: the plain-prompt solve count over `mechanism.samples` samples, and the mean over its
    reference responses of `reference_scores` (None without references)."""
    from hdpo.models import eval_mode
    from hdpo.update import MicroBatching

    m = cfg.mechanism
    tok, model, gen = _engine(cfg, model_name)
    plain_text = [render_prompt(tok, build_messages(p, cfg.data.system_prompt)) for p in problems]
    seeds = [problem_seed(m.seed, SOLVE_STREAM, p.id) for p in problems]
    groups = gen.generate(plain_text, m.samples, _sampling(cfg), seeds)
    with _scorer(cfg) as scorer:
        rewards = scorer.score([r.text for g in groups for r in g],
                               [p.answer for p in problems for _ in range(m.samples)])
    by_id = {r["id"]: r["references"] for r in references}
    owner, plain, privileged, responses = [], [], [], []
    for i, p in enumerate(problems):
        refs = by_id.get(p.id, [])
        if not refs:
            continue
        priv_text = render_prompt(tok, build_messages(p, cfg.data.system_prompt, cfg.hdpo.privileged_info))
        plain_ids = tok(plain_text[i], add_special_tokens=False).input_ids  # once per problem, shared by its refs
        priv_ids = tok(priv_text, add_special_tokens=False).input_ids
        for ref in refs:
            owner.append(i)
            plain.append(plain_ids)
            privileged.append(priv_ids)
            responses.append(ref["response_ids"])
    micro = MicroBatching.from_config(cfg.grpo, tok.pad_token_id if tok.pad_token_id is not None else 0)
    with eval_mode(model):
        logp, jsd = reference_scores(model, micro, plain, privileged, responses, cfg.hdpo.topk_logits_k,
                                     _sampling(cfg).temperature)
    rows = []
    for i, p in enumerate(problems):
        mine = [j for j, o in enumerate(owner) if o == i]
        rows.append({"id": p.id, "solved": int(sum(x >= 1.0 for x in rewards[i * m.samples:(i + 1) * m.samples])),
                     "samples": m.samples, "references": len(mine),
                     "ref_logprob": float(np.mean([logp[j] for j in mine])) if mine else None,
                     "ref_jsd": float(np.mean([jsd[j] for j in mine])) if mine else None})
    log.info("%s: plain solve rate %.3f over %d problems x %d samples", model_name,
             sum(r["solved"] for r in rows) / (len(rows) * m.samples), len(rows), m.samples)
    return rows


# --- the analysis: pure functions of the ledgers and the measurements ----------------------------------------------

def cliff_sets(ids: list[str], ledgers: dict[tuple[str, int], list[dict]], hdpo: str, seeds: list[int]
               ) -> tuple[list[str], list[str]]:
    """(distilled cliffs: distilled at least once by `hdpo` in every seed; never a cliff in any run), in the
    order of `ids`."""
    distilled = [{r["id"] for r in ledgers[(hdpo, s)] if r["distilled"]} for s in seeds]
    ever_cliff = {r["id"] for rows in ledgers.values() for r in rows if r["cliff"]}
    return ([i for i in ids if all(i in d for d in distilled)], [i for i in ids if i not in ever_cliff])


def per_problem(ids: list[str], ledgers: dict[tuple[str, int], list[dict]], measures: dict[str, dict[str, dict]],
                methods: list[str], seeds: list[int], hdpo: str) -> list[dict]:
    """One row per (method, seed, problem): the ledger's counts, the measurements at the end and at step 0, and
    the set the problem belongs to."""
    distilled, never = cliff_sets(ids, ledgers, hdpo, seeds)
    base = measures["base"]
    rows = []
    for method in methods:
        for seed in seeds:
            ledger = ledgers[(method, seed)]
            final = measures[f"{method}_seed{seed}"]
            for pid in ids:
                mine = [r for r in ledger if r["id"] == pid]
                first = min((r["step"] for r in mine if r["distilled"]), default=None)
                b, f = base[pid], final[pid]
                rows.append({
                    "method": method, "seed": seed, "id": pid,
                    "set": "distilled_cliff" if pid in distilled else "never_cliff" if pid in never else "other",
                    "visits": len(mine), "cliff_visits": sum(r["cliff"] for r in mine),
                    "distilled_visits": sum(r["distilled"] for r in mine), "first_distilled_step": first,
                    "solve_base": b["solved"] / b["samples"], "solve_final": f["solved"] / f["samples"],
                    "references": f["references"],
                    "ref_logprob_base": b["ref_logprob"], "ref_logprob_final": f["ref_logprob"],
                    "ref_jsd_base": b["ref_jsd"], "ref_jsd_final": f["ref_jsd"]})
    return rows


def _matrix(rows: list[dict], method: str, seeds: list[int], ids: list[str], value) -> np.ndarray:
    at = {(r["method"], r["seed"], r["id"]): r for r in rows}
    return np.array([[value(at[(method, s, i)]) for i in ids] for s in seeds], dtype=float)


OUTCOMES = [  # (key, what, set, value of a per-problem row, bounds of a method's mean)
    ("a_logprob", "Δ log-likelihood per token of correct privileged responses (plain prompt), end − start",
     "distilled_cliff", lambda r: r["ref_logprob_final"] - r["ref_logprob_base"], None),
    ("a_jsd", "Δ JSD student (plain) vs teacher (privileged) on those responses, end − start",
     "distilled_cliff", lambda r: r["ref_jsd_final"] - r["ref_jsd_base"], None),
    ("b_solve", "plain-prompt solve rate at the end", "distilled_cliff", lambda r: r["solve_final"], (0.0, 1.0)),
    ("c_solve", "plain-prompt solve rate at the end", "never_cliff", lambda r: r["solve_final"], (0.0, 1.0)),
]


def outcomes(rows: list[dict], grpo: str, hdpo: str, seeds: list[int]) -> list[dict]:
    """One row per pre-registered outcome: each method's mean with its 95% interval and HDPO - GRPO paired by
    problem and seed (interval, p). An outcome whose set is empty (or, for (a), has no reference responses)
    says so instead of a number."""
    out = []
    for key, what, subset, value, bounds in OUTCOMES:
        ids = sorted({r["id"] for r in rows if r["set"] == subset
                      and (not key.startswith("a_") or r["references"] > 0)})
        row: dict = {"outcome": key, "measure": what, "set": subset, "problems": len(ids), "seeds": len(seeds)}
        if ids:
            g, h = (_matrix(rows, m, seeds, ids, value) for m in (grpo, hdpo))
            ivs: dict[str, Interval] = {"grpo": mean_interval(g, bounds=bounds),
                                        "hdpo": mean_interval(h, bounds=bounds),
                                        "diff": paired_difference(h, g)}
            if key == "b_solve":  # where the former cliffs started
                ivs["base"] = mean_interval(_matrix(rows, grpo, seeds, ids, lambda r: r["solve_base"]), bounds=bounds)
            for name, iv in ivs.items():
                row.update({name: iv.estimate, f"{name}_low": iv.low, f"{name}_high": iv.high})
            row["p"] = ivs["diff"].p_value
        out.append(row)
    return out
