"""HDPO training (the paper's Algorithm 1), GRPO when lambda = 0. Read top to bottom:

  step t:  rollouts (K per prompt, plain prompt) -> math-verify rewards -> leave-one-out advantages
           -> cliffs (prompts whose K rewards sum to 0, at most `max_cliff_prompts_per_step`)
           -> privileged rollouts on cliff prompts (problem + ground truth), keep those with reward 1
           -> teacher top-k log-probs on the privileged context (drifting: current weights; frozen: step 0)
           -> student forward on the plain context over the same tokens
           -> L = L_GRPO / N_grpo + lambda * L_JSD / N_distill, both counts summed over ranks and micro-batches
           -> AdamW step (warm-up, weight decay, grad-norm clip)

Runs as one process or under torchrun (gradients are summed over ranks, so every rank's loss is already
divided by the global token count). Checkpoints (model, optimizer, scheduler, RNG, step, best-so-far) are
written atomically to the work dir, which is not a Snakemake output, and `resume` continues the trajectory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from hdpo import checkpoint as ckpt
from hdpo import distributed as dist
from hdpo import faults
from hdpo import ledger as cliff_ledger
from hdpo.config import Config, save_config
from hdpo.data import Problem, build_messages, read_problems, render_prompt
from hdpo.evaluate import score_problems, summarise
from hdpo.generation import Sampling, Speculation, follow_seed, make_generator, prompt_seeds
from hdpo.io import append_jsonl, atomic_dir, atomic_path, clean_stale, read_jsonl, recover_dir, write_json, write_jsonl
from hdpo.logprobs import (DEFAULT_CHUNK, chunked_token_logprobs, chunked_topk, chunked_topk_jsd, output_projection,
                           plan_micro_batches, response_hidden)
from hdpo.losses import grpo_token_loss_sum, leave_one_out_advantages, sampler_correction_weights
from hdpo.models import (autocast, default_device, dynamic_shape_attention, eval_mode, load_model, load_tokenizer,
                         resolve_model)
from hdpo.reward import RewardScorer, RewardStats
from hdpo.tracking import is_terminal, make_tensorboard, step_line

log = logging.getLogger(__name__)


class NonFiniteLoss(ckpt.RunError):
    pass


# --- pure pieces -------------------------------------------------------------------------------------

def warmup_factor(step: int, warmup_steps: int, start: float) -> float:
    """Linear warm-up from `start` x lr to 1 x lr over `warmup_steps`, then constant (Table 2)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return start + (1.0 - start) * step / warmup_steps


def batch_indices(step: int, batch_size: int, num_problems: int, seed: int) -> list[int]:
    """The prompts of a step: consecutive slices of a per-epoch seeded permutation. A pure function of the
    step, so a resumed run draws exactly the batches it would have drawn."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, num_problems)
        perm = np.random.default_rng([seed, epoch]).permutation(num_problems)
        out.append(int(perm[i]))
    return out


def select_cliffs(rewards: torch.Tensor, threshold: float, cap: int, cliffs_before_me: int) -> list[int]:
    """Indices (into this rank's groups) of cliff prompts kept under the global per-step cap; ranks fill the
    cap in rank order, so the selection does not depend on how prompts are split."""
    is_cliff = (rewards.sum(-1) <= threshold).nonzero().flatten().tolist()
    room = max(0, cap - cliffs_before_me)
    return is_cliff[:room]


def seed_everything(*parts: int) -> None:
    """Seed python, numpy and torch from (seed, step, rank): every step's sampling is reproducible."""
    s = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# --- forward passes over (prompt, response) pairs ----------------------------------------------------

def response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Logits that predict each response token, [B, T, V], and the response mask [B, T].

    Prompts are left-padded and responses right-padded, so every response starts at the same column and
    position t of the result is aligned across two calls with different prompts (student: plain prompt;
    teacher: privileged prompt). Only the response region's logits are computed (`logits_to_keep`).
    """
    device = next(model.parameters()).device
    B, W, T = len(prompts), max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((B, W + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, W + T), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, W - len(p):W] = torch.tensor(p)
        ids[i, W:W + len(r)] = torch.tensor(r)
        attn[i, W - len(p):W + len(r)] = 1
    positions = (attn.cumsum(-1) - 1).clamp_min(0)
    ids, attn, positions = ids.to(device), attn.to(device), positions.to(device)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=T + 1).logits
    return logits[:, :-1], attn[:, W:].to(logits.dtype), ids[:, W:]


@dataclass
class DistillItem:
    """A kept privileged rollout: the student's plain prompt, the tokens, and the teacher's top-k there."""
    prompt_ids: list[int]
    response_ids: list[int]
    topk_logits: torch.Tensor  # [T, k] the teacher's top-k logits (renormalised inside the JSD)
    topk_ids: torch.Tensor  # [T, k]


@torch.no_grad()
def teacher_topk(teacher, priv_prompts: list[list[int]], responses: list[list[int]], k: int, pad_id: int,
                 micro: int, token_budget: Optional[int] = None, pack: bool = False, temperature: float = 1.0,
                 chunk: int = DEFAULT_CHUNK, tails: Optional[list] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k of logits / temperature at each response token, per rollout ([T, k] values, ids),
    from its final hidden states in chunks of positions (no [tokens, vocab] tensor for the micro-batch).
    `tails`, if given, receives per trajectory the probability mass the cut leaves out at each token (for the
    cliff ledger)."""
    weight, bias = output_projection(teacher)
    out: list = [None] * len(responses)
    tails_by: list = [None] * len(responses)
    lengths = [len(p) + len(r) for p, r in zip(priv_prompts, responses)]
    for mb in plan_micro_batches(lengths, micro, token_budget, pack):
        hidden, _ = response_hidden(teacher, [priv_prompts[i] for i in mb], [responses[i] for i in mb], pad_id, pack)
        if tails is None:
            vals, ids = chunked_topk(hidden, weight, bias, k, temperature, chunk)
        else:
            vals, ids, tail = chunked_topk(hidden, weight, bias, k, temperature, chunk, with_tail=True)
            tail = tail.cpu()
        vals, ids = vals.cpu(), ids.cpu()
        start = 0
        for i in mb:
            n = len(responses[i])
            out[i] = (vals[start:start + n], ids[start:start + n])
            if tails is not None:
                tails_by[i] = tail[start:start + n]
            start += n
    if tails is not None:
        tails.extend(tails_by)
    return out


def accumulate_gradients(model, grpo: list[tuple[list[int], list[int], float]], distill: list[DistillItem],
                         n_grpo: float, n_distill: float, distill_weight: float, micro: int, pad_id: int,
                         clip_low: float, clip_high: float, old_logprobs: Optional[list[list[float]]] = None,
                         sampler_logprobs: Optional[list[list[float]]] = None, amp=contextlib.nullcontext,
                         token_budget: Optional[int] = None, pack: bool = False, temperature: float = 1.0,
                         chunk: int = DEFAULT_CHUNK, correction: tuple[str, float] = ("none", 2.0)) -> dict:
    """Backward of L_GRPO/N_grpo + lambda L_JSD/N_distill for this rank's share, micro-batch by micro-batch.

    `grpo` holds (prompt ids, response ids, advantage) of the rollouts with a non-zero advantage (the others
    contribute exactly zero loss and gradient, but their tokens count in the global `n_grpo`).
    `old_logprobs`: pi_old per token; None means on-policy (pi_old = the current weights, detached).
    `sampler_logprobs`: the generator's log-probs of the same tokens, to measure engine/trainer mismatch and,
    with `correction` = (grpo.sampler_correction, its cap) not "none", to weight the GRPO term by truncated
    importance weights (`hdpo.losses.sampler_correction_weights`).
    Micro-batches: at most `micro` sequences and `token_budget` tokens each, sorted by length, optionally
    packed (`hdpo.logprobs.plan_micro_batches`); log-probs come from the hidden states `chunk` positions at a
    time. Returns this rank's loss parts (already divided by the global counts), the mismatch sums and the
    correction's weight sum, capped count and units (tokens or rollouts).
    """
    device = next(model.parameters()).device
    weight, bias = output_projection(model)
    parts = {"grpo": 0.0, "jsd": 0.0, "mismatch_sum": 0.0, "mismatch_tokens": 0.0, "is_weight_sum": 0.0,
             "is_capped": 0.0, "is_units": 0.0}
    mode, cap = correction
    if mode != "none" and sampler_logprobs is None:
        raise ValueError(f"sampler correction {mode!r} needs the sampler's log-probs")
    for mb in plan_micro_batches([len(c[0]) + len(c[1]) for c in grpo], micro, token_budget, pack):
        chunk_items = [grpo[i] for i in mb]
        if not any(c[1] for c in chunk_items):
            continue  # only empty responses (over-long prompts): nothing to score
        with amp():  # the forward in mixed precision; the loss math below in float32
            hidden, ids = response_hidden(model, [c[0] for c in chunk_items], [c[1] for c in chunk_items], pad_id,
                                          pack)
            lp = chunked_token_logprobs(hidden, weight, bias, ids[:, None], temperature, chunk).squeeze(-1)
        if old_logprobs is None:
            old = lp.detach()
        else:
            old = torch.tensor([x for i in mb for x in old_logprobs[i]], dtype=lp.dtype, device=device)
        weights = None
        if sampler_logprobs is not None:
            lengths = [len(c[1]) for c in chunk_items]
            if [len(sampler_logprobs[i]) for i in mb] != lengths:
                raise ValueError("the sampler's log-probs do not cover the rollouts' tokens one to one")
            sampled = torch.tensor([x for i in mb for x in sampler_logprobs[i]], dtype=lp.dtype, device=device)
            parts["mismatch_sum"] += (lp.detach() - sampled).abs().sum().item()
            parts["mismatch_tokens"] += sampled.numel()
            if mode != "none":
                weights, capped = sampler_correction_weights(old, sampled, lengths, mode, cap)
                parts["is_weight_sum"] += float(weights.sum())
                parts["is_capped"] += float(capped.sum())
                parts["is_units"] += capped.numel()
        # one advantage per token (the flat layout has no padding, so the mask is all ones)
        adv = torch.tensor([c[2] for c in chunk_items for _ in c[1]], dtype=lp.dtype, device=device)
        loss = grpo_token_loss_sum(lp[:, None], old[:, None], adv, torch.ones_like(lp)[:, None], clip_low,
                                   clip_high, None if weights is None else weights[:, None]) / n_grpo
        loss.backward()
        parts["grpo"] += loss.item()
    for mb in plan_micro_batches([len(d.prompt_ids) + len(d.response_ids) for d in distill], micro, token_budget,
                                 pack):
        chunk_items = [distill[i] for i in mb]
        if not any(c.response_ids for c in chunk_items):
            continue
        t_vals = torch.cat([c.topk_logits for c in chunk_items]).to(device)
        t_ids = torch.cat([c.topk_ids for c in chunk_items]).to(device)
        with amp():
            hidden, _ = response_hidden(model, [c.prompt_ids for c in chunk_items],
                                        [c.response_ids for c in chunk_items], pad_id, pack)
            jsd = chunked_topk_jsd(hidden, weight, bias, t_ids, t_vals, temperature, chunk).sum() / n_distill
        (distill_weight * jsd).backward()
        parts["jsd"] += jsd.item()
    return parts


# --- the trainer -------------------------------------------------------------------------------------

@dataclass
class TrainState:
    step: int = 0
    best: dict = field(default_factory=dict)  # metric -> {"value", "step"}


class Trainer:
    def __init__(self, cfg: Config, data_dir: str | Path, run_dir: str | Path, work_dir: str | Path,
                 model_cache: str | Path):
        self.cfg, self.run_dir, self.work_dir = cfg, Path(run_dir), Path(work_dir)
        self.rank, self.world = dist.init()
        self.device = default_device()
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.train_set = read_problems(Path(data_dir) / "train.jsonl")
        self.val_set = read_problems(Path(data_dir) / "val.jsonl")
        if cfg.grpo.num_prompts_per_step % self.world:
            raise ValueError(f"grpo.num_prompts_per_step={cfg.grpo.num_prompts_per_step} must divide evenly "
                             f"over {self.world} ranks")

        if self.rank == 0:
            self.model_name = resolve_model(cfg.model, model_cache)  # converts a GGUF once
        dist.barrier()
        self.model_name = resolve_model(cfg.model, model_cache)
        self.tok = load_tokenizer(self.model_name)
        self.pad_id = self.tok.pad_token_id
        self.policy = load_model(self.model_name, cfg.model.dtype, self.device, trainable=True,
                                 activation_checkpointing=cfg.model.activation_checkpointing)
        self.amp = lambda: autocast(self.device, cfg.model.dtype)
        # how the update and the teacher forward split their sequences (speed and memory, never the loss)
        self.micro_kw = dict(token_budget=cfg.grpo.micro_batch_tokens, pack=cfg.grpo.sequence_packing,
                             chunk=cfg.grpo.logprob_chunk_size)
        self.policy.train()
        self.hdpo_on = cfg.hdpo.distill_weight > 0  # lambda = 0 is GRPO
        # The frozen teacher is the step-0 network, kept apart (re-loaded from the source on resume).
        self.frozen = None
        if self.hdpo_on and cfg.hdpo.teacher == "frozen":
            self.frozen = load_model(self.model_name, cfg.model.dtype, self.device).eval().requires_grad_(False)
        g = cfg.generation
        self.generator = make_generator(g.backend, self.policy, self.tok, g.batch_size,
                                        cfg.model.max_total_sequence_length, g.gpu_memory_utilization,
                                        cfg.model.dtype, g.vllm_cpu_kv_cache_gib)
        self.priv_generator = self.generator
        if self.frozen is not None and cfg.hdpo.privileged_sampler == "teacher":
            self.priv_generator = make_generator(g.backend, self.frozen, self.tok, g.batch_size,
                                                 cfg.model.max_total_sequence_length, g.gpu_memory_utilization,
                                                 cfg.model.dtype, g.vllm_cpu_kv_cache_gib)
        # One decode loop runs the rollouts and the cliffs' privileged rollouts when the policy samples both and
        # the cap cannot cut the cliffs (cap >= prompts per step, the paper's setting): fixed for the run.
        self.overlap = (self.hdpo_on and self.priv_generator is self.generator
                        and cfg.hdpo.max_cliff_prompts_per_step >= cfg.grpo.num_prompts_per_step)
        if self.hdpo_on and cfg.hdpo.privileged_start == "speculative":
            if not self.overlap or g.backend != "transformers":
                log.warning("hdpo.privileged_start=speculative needs the transformers backend, the policy sampling "
                            "the privileged rollouts and a cliff cap >= prompts per step: they start after the "
                            "rollouts")
            elif g.batch_size < cfg.grpo.num_prompts_per_step // self.world * (cfg.grpo.num_generations_per_prompt
                                                                                + cfg.privileged_rollouts):
                log.warning("hdpo.privileged_start=speculative: generation.batch_size=%d has no room for every "
                            "prompt's rollouts and privileged rollouts at once, so the privileged ones wait behind "
                            "the rollouts (fewer decoding steps saved)", g.batch_size)
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_factor(s, o.warmup_steps, o.warmup_start_factor))
        self.scorer = RewardScorer(cfg.eval.reward_workers, cfg.eval.reward_timeout_s,
                                   retry_timeout_s=cfg.eval.reward_retry_timeout_s)
        self.scorer.start()  # workers warm up while the models load
        self.sampling = Sampling(g.temperature, g.top_p, g.max_new_tokens or cfg.model.max_total_sequence_length)
        self.state = TrainState()
        self.metrics_path = self.work_dir / "metrics.jsonl"
        self.ledger_path = self.work_dir / "cliffs.jsonl"  # the cliff ledger (hdpo/ledger.py)
        self.val_records_path = self.work_dir / "val_problems.jsonl"  # per-problem validation results
        self.ledger: list[dict] = []  # every rank keeps it: expand-then-sharpen reads it to draw batches
        self._slots: tuple[list[int], list] = ([], [])
        self.tensorboard = None
        self.ckpt_path = self.work_dir / "checkpoint.pt"
        self._t0, self._wall_before, self._ckpt_step, self._lock = time.time(), 0.0, None, None

    # -- prompts ------------------------------------------------------------------------------------
    def _prompt(self, p: Problem, privileged: Optional[str] = None) -> str:
        return render_prompt(self.tok, build_messages(p, self.cfg.data.system_prompt, privileged))

    def _my_problems(self, step: int) -> list[Problem]:
        B = self.cfg.grpo.num_prompts_per_step
        idx = batch_indices(step, B, len(self.train_set), self.cfg.seed)
        origins: list = [None] * len(idx)
        delay = self.cfg.hdpo.reinject_cliffs_after_steps
        if delay is not None:  # expand-then-sharpen: former cliffs take the last slots, a function of the ledger
            cap = self.cfg.hdpo.reinject_max_per_step or max(1, B // 4)
            idx, origins = cliff_ledger.place_reinjections(
                idx, cliff_ledger.due_reinjections(self.ledger, step + 1, delay, cap))
        per = B // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        self._slots = (idx[mine], origins[mine])
        return [self.train_set[i] for i in idx[mine]]

    # -- one step of Algorithm 1 --------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        cfg, h, K = self.cfg, self.cfg.hdpo, self.cfg.grpo.num_generations_per_prompt
        seed_everything(cfg.seed, step, self.rank)
        times, t = {}, time.time()
        problems = self._my_problems(step)

        # 1. rollouts on the plain prompt; 2. rewards; 5. privileged rollouts on cliffs. With self.overlap, one
        # decode loop runs both: a cliff's privileged rollouts start as soon as its K rollouts are scored, beside
        # the rollouts still running (same samples as the two phases one after the other:
        # Generator.generate_then); with hdpo.privileged_start=speculative every prompt's start at once and stop
        # at its first correct rollout.
        answers = [p.answer for p in problems]
        stats_before = self.scorer.stats.as_dict()
        group_rewards: dict[int, list[float]] = {}
        scoring = [0.0]  # seconds inside the loop spent scoring (the GPU waits): reported as the reward phase

        speculate, scores = None, {}
        if self.overlap and h.privileged_start == "speculative":
            def ruled_out(done: list) -> set[int]:
                """Score rollouts as they finish; rewards are >= 0, so a partial sum above the threshold is final."""
                t0 = time.time()
                got = self.scorer.score([r.text for _, _, r in done], [answers[i] for i, _, _ in done])
                scoring[0] += time.time() - t0
                for (i, j, _), reward in zip(done, got):
                    scores.setdefault(i, {})[j] = reward
                return {i for i, _, _ in done if sum(scores[i].values()) > h.cliff_reward_sum}

            speculate = Speculation({i: self._prompt(p, h.privileged_info) for i, p in enumerate(problems)},
                                    ruled_out)

        def cliff_then(i: int, group: list) -> Optional[str]:
            t0 = time.time()
            group_rewards[i] = ([scores[i][j] for j in range(K)] if speculate is not None
                                else self.scorer.score([r.text for r in group], [answers[i]] * K))
            scoring[0] += time.time() - t0
            return self._prompt(problems[i], h.privileged_info) if self.overlap and (
                sum(group_rewards[i]) <= h.cliff_reward_sum) else None

        M = cfg.privileged_rollouts
        seeds = prompt_seeds(None, len(problems))  # from torch's RNG, seeded per (seed, step, rank)
        with self.amp():
            groups, early = self.generator.generate_then([self._prompt(p) for p in problems], K, self.sampling,
                                                         cliff_then, M, seeds, speculate)
        faults.hit("rollout")
        times["rollout"], t = time.time() - t - scoring[0], time.time() - scoring[0]
        # 2. rewards and leave-one-out advantages
        flat = [r for g in groups for r in g]
        rewards = torch.tensor([group_rewards[i] for i in range(len(problems))], dtype=torch.float32)
        adv = leave_one_out_advantages(rewards, cfg.grpo.normalize_rewards, cfg.grpo.use_leave_one_out_baseline,
                                       std=cfg.grpo.advantage_std)
        times["reward"], t = time.time() - t, time.time()

        # 4. cliffs, capped globally per step
        n_cliffs_all = dist.gather(int((rewards.sum(-1) <= h.cliff_reward_sum).sum()))
        cliffs = select_cliffs(rewards, h.cliff_reward_sum, h.max_cliff_prompts_per_step, sum(n_cliffs_all[:self.rank]))
        # 5-6. privileged rollouts, R=1 filter, teacher top-k on the privileged context
        distill, generated, kept = [], 0, 0
        gen_per, kept_per, tail_per = {}, {}, {}  # per position in this rank's batch, for the cliff ledger
        n_grpo_local = sum(len(r.response_ids) for r in flat)  # GRPO's token normaliser (this rank's share)
        dropped = (speculate.dropped_rows, speculate.dropped_tokens) if speculate is not None else (0, 0)
        gen_tokens = n_grpo_local + dropped[1]  # every decoded token counts, speculative ones dropped too
        if self.hdpo_on and cliffs:
            cliff_problems = [problems[i] for i in cliffs]
            if self.overlap:
                assert sorted(early) == cliffs, (sorted(early), cliffs)
                priv = [early[i] for i in cliffs]
            else:
                priv_prompts = [self._prompt(p, h.privileged_info) for p in cliff_problems]
                with self.amp():
                    priv = self.priv_generator.generate(priv_prompts, M, self.sampling,
                                                        [follow_seed(seeds[i]) for i in cliffs])
            # generation and math-verify apart: LaTeX-heavy privileged answers can make scoring the slow part
            times["privileged"], t = time.time() - t, time.time()
            pflat = [r for g in priv for r in g]
            prew = self.scorer.score([r.text for r in pflat], [p.answer for p in cliff_problems for _ in range(M)])
            generated = len(pflat)
            gen_tokens += sum(len(r.response_ids) for r in pflat)
            keep = [(ci, r) for ci, g in enumerate(priv) for r in g]
            keep = [(ci, r) for (ci, r), rw in zip(keep, prew) if rw >= h.teacher_min_reward]
            kept = len(keep)
            gen_per = {cliffs[ci]: M for ci in range(len(cliff_problems))}
            for ci, _ in keep:
                kept_per[cliffs[ci]] = kept_per.get(cliffs[ci], 0) + 1
            times["privileged_reward"], t = time.time() - t, time.time()
            if keep:
                plain_ids = {ci: self.tok(self._prompt(cliff_problems[ci]), add_special_tokens=False).input_ids
                             for ci, _ in keep}
                teacher = self.policy if self.frozen is None else self.frozen
                tails: list = []
                with self.amp(), eval_mode(teacher):
                    tk = teacher_topk(teacher, [r.prompt_ids for _, r in keep], [r.response_ids for _, r in keep],
                                      h.topk_logits_k, self.pad_id, cfg.grpo.micro_batch_size, **self.micro_kw,
                                      temperature=self.sampling.temperature, tails=tails)
                by_prompt: dict = {}
                for (ci, _), tail in zip(keep, tails):
                    by_prompt.setdefault(cliffs[ci], []).append(tail)
                tail_per = {j: cliff_ledger.tail_summary(torch.cat(ts).tolist()) for j, ts in by_prompt.items()}
                distill = [DistillItem(plain_ids[ci], r.response_ids, v, i) for (ci, r), (v, i) in zip(keep, tk)]
            times["teacher"], t = time.time() - t, time.time()

        # 3 + 6 + 7. the update: both token counts summed over ranks (and micro-batches)
        n_distill_local = sum(len(d.response_ids) for d in distill)
        n_grpo, n_distill = dist.sum_all([n_grpo_local, n_distill_local])
        active = [(r, float(a)) for r, a in zip(flat, adv.flatten().tolist()) if a != 0.0]
        grpo_items = [(r.prompt_ids, r.response_ids, a) for r, a in active]
        # Zero tensors, not None: every rank all-reduces the same tensors (a rank may have nothing to backward),
        # and a step with no signal is the same optimizer step on 1 or N ranks.
        for p in self.policy.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()
        parts = accumulate_gradients(self.policy, grpo_items, distill, max(n_grpo, 1.0), max(n_distill, 1.0),
                                     h.distill_weight, cfg.grpo.micro_batch_size, self.pad_id,
                                     cfg.grpo.ratio_clip_min, cfg.grpo.ratio_clip_max,
                                     sampler_logprobs=[r.logprobs for r, _ in active], amp=self.amp, **self.micro_kw,
                                     temperature=self.sampling.temperature,
                                     correction=(cfg.grpo.sampler_correction, cfg.grpo.sampler_correction_cap))
        dist.sum_gradients([p for p in self.policy.parameters() if p.requires_grad])
        loss_grpo, loss_jsd = dist.sum_all([parts["grpo"], parts["jsd"]])
        loss = loss_grpo + h.distill_weight * loss_jsd
        if faults.hit("grad") == "inf":  # test-only: a gradient that overflows while the loss stays finite
            next(self.policy.parameters()).grad.view(-1)[0] = math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optimizer.max_grad_norm))
        # Checked before the optimizer: one inf/NaN would poison the weights and AdamW's moments for good.
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            what = (f"non-finite loss {loss} (grpo {loss_grpo}, jsd {loss_jsd})" if not math.isfinite(loss)
                    else f"non-finite gradient norm {grad_norm} (loss {loss})")
            if cfg.optimizer.on_nonfinite != "skip":
                raise NonFiniteLoss(f"step {step + 1}: {what}: stopped before the optimizer step; "
                                    f"{self._last_good()}; optimizer.on_nonfinite=skip skips such steps")
            log.warning("step %d: %s: step skipped (no update)", step + 1, what)
        lr = self.optimizer.param_groups[0]["lr"]
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the step number, skipped or not
        if not skipped:
            self.generator.update_weights(self.policy)
        times["update"] = time.time() - t
        times["step"] = sum(times.values())

        # the cliff ledger: one row per prompt of the step, from every rank
        ledger_rows = cliff_ledger.step_rows(step + 1, self._slots[0], [p.id for p in problems], rewards.tolist(),
                                             h.cliff_reward_sum, cliffs, gen_per, kept_per, self._slots[1], tail_per)
        ledger_rows = [r for part in dist.gather(ledger_rows) for r in part]
        self.ledger.extend(ledger_rows)
        if self.rank == 0:
            _append_rows(self.ledger_path, ledger_rows)

        # metrics, summed or averaged over ranks
        stats_after = self.scorer.stats.as_dict()
        local = [float(rewards.sum()), float(rewards.numel()), len(problems),
                 float(n_cliffs_all[self.rank]), len(cliffs), generated, kept,
                 gen_tokens,
                 stats_after["parse_failures"] - stats_before["parse_failures"],
                 stats_after["timeouts"] - stats_before["timeouts"],
                 stats_after["timeouts_retried"] - stats_before["timeouts_retried"],
                 parts["mismatch_sum"], parts["mismatch_tokens"], *dropped,
                 parts["is_weight_sum"], parts["is_capped"], parts["is_units"]]
        (rsum, rnum, nprob, ncliff, nsel, gen_all, kept_all, gen_tokens, pf, to, retried, mm_sum,
         mm_tok, drop_rows, drop_tokens, is_wsum, is_capped, is_units) = dist.sum_all(local)
        return {
            "kind": "train", "step": step + 1,
            "loss/total": loss, "loss/grpo": loss_grpo, "loss/jsd": loss_jsd,
            "reward/mean": rsum / rnum, "cliffs": int(ncliff), "cliffs/distilled": int(nsel),
            "cliff_fraction": ncliff / nprob,
            "cliffs/reinjected": sum(r["reinjected_from"] is not None for r in ledger_rows),
            "privileged/generated": int(gen_all), "privileged/kept": int(kept_all),
            "teacher_pass_rate": kept_all / gen_all if gen_all else None,
            "tokens/grpo": int(n_grpo), "tokens/distill": int(n_distill), "tokens/generated": int(gen_tokens),
            "tokens/privileged": int(gen_tokens - n_grpo),  # the privileged phase's share (per-phase speed)
            # hdpo.privileged_start=speculative: privileged rollouts started ahead and dropped (no cliff), and
            # their tokens (inside tokens/privileged and tokens/generated)
            "privileged/dropped": int(drop_rows), "tokens/dropped": int(drop_tokens),
            "reward/parse_failures": int(pf), "reward/timeouts": int(to),
            "reward/timeouts_retried": int(retried),  # re-scored with eval.reward_retry_timeout_s
            "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "nonfinite_skipped": int(skipped),
            # |log p_sampler - log p_trainer| on sampled tokens (rollouts with a non-zero advantage)
            "logprob/sampler_vs_trainer_abs_diff": mm_sum / mm_tok if mm_tok else None,
            # grpo.sampler_correction: the mean truncated importance weight (per token: over tokens; per sequence:
            # over the tokens, each weighted by its rollout's) and the fraction of tokens/rollouts the cap cut
            "sampler_correction/mean_weight": is_wsum / mm_tok if is_units and mm_tok else None,
            "sampler_correction/capped_fraction": is_capped / is_units if is_units else None,
            **_mean_times(times),
        }

    # -- validation ---------------------------------------------------------------------------------
    def validate(self, step: int) -> dict:
        t = time.time()
        mine = self.val_set[self.rank::self.world]
        if self.rank == 0:
            log.info("step %d: validating on %d problems x %d samples%s", step, len(self.val_set),
                     self.cfg.eval.num_samples, " + greedy" if self.cfg.eval.greedy else "")
        seed_everything(self.cfg.seed, 10**6 + step, self.rank)
        with self.amp():
            _, records = score_problems(mine, self.generator, self.tok, self.scorer, self.cfg, "validation")
        counts = [c for part in dist.gather([r["num_correct"] for r in records]) for c in part]
        greedy = [g for part in dist.gather([r.get("greedy", {}).get("reward") for r in records]) for g in part]
        res = summarise(counts, greedy, self.cfg.eval.num_samples, self.cfg.eval.pass_k)
        ids = [i for part in dist.gather([r["id"] for r in records]) for i in part]
        if self.rank == 0:  # per-problem results: the report's paired bootstrap and held-out protocol need them
            _append_rows(self.val_records_path, [{"step": step, "num_samples": self.cfg.eval.num_samples,
                                                  "ids": ids, "num_correct": counts, "greedy": greedy}])
        return {"kind": "val", "step": step, **{f"val/{k}": v for k, v in res.items()},
                "val/num_problems": len(counts), "val/num_samples": self.cfg.eval.num_samples,
                "time/eval": round(time.time() - t, 3)}

    def probe_cliffs(self, step: int) -> dict:
        """The cliff probe: plain-prompt samples on the run's earliest former cliffs (eval.cliff_probe_problems)
        -> metrics for the val row, and one record in val_problems.jsonl (set "cliff_probe")."""
        limit = self.cfg.eval.cliff_probe_problems
        former = cliff_ledger.former_cliffs(self.ledger, limit) if limit and step > 0 else []
        if not former:
            return {}
        cfg = dataclasses.replace(self.cfg, eval=dataclasses.replace(self.cfg.eval, greedy=False))
        problems = [self.train_set[i] for i, _ in former]
        seed_everything(self.cfg.seed, 2 * 10**6 + step, self.rank)
        with self.amp():
            _, records = score_problems(problems[self.rank::self.world], self.generator, self.tok, self.scorer, cfg,
                                        "cliff_probe")
        counts = [c for part in dist.gather([r["num_correct"] for r in records]) for c in part]
        order = [i for r in range(self.world) for i in range(r, len(former), self.world)]  # gather order
        former = [former[i] for i in order]
        if self.rank == 0:
            _append_rows(self.val_records_path, [{"step": step, "set": "cliff_probe", "num_samples": cfg.eval.num_samples,
                                                  "ids": [self.train_set[i].id for i, _ in former],
                                                  "indices": [i for i, _ in former],
                                                  "cliff_steps": [s for _, s in former], "num_correct": counts}])
        n = cfg.eval.num_samples
        return {"probe/former_cliffs": len(counts), "probe/solved": sum(c > 0 for c in counts) / len(counts),
                "probe/pass@1": sum(counts) / (n * len(counts))}

    def _track_best(self, row: dict, step: int) -> bool:
        improved = False
        for key, value in row.items():
            if key.startswith("val/") and isinstance(value, float) and math.isfinite(value):
                name = key[4:]
                if name not in self.state.best or value > self.state.best[name]["value"]:
                    self.state.best[name] = {"value": value, "step": step}
                    improved |= name == self.cfg.checkpoint.best_metric
        return improved

    # -- checkpoints --------------------------------------------------------------------------------
    def save_policy(self, dest: Path, step: int, checkpoint: str) -> None:
        if self.rank != 0:
            return
        with atomic_dir(dest) as tmp:
            self.policy.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
            meta = {"run": self.run_dir.name, "method": self.cfg.run.method, "seed": self.cfg.seed,
                    "checkpoint": checkpoint, "model_step": step}
            (tmp / "hdpo_meta.json").write_text(json.dumps(meta, indent=2))

    def save_checkpoint(self) -> int:
        """Write model, optimizer, scheduler, RNG, step, best-so-far and the run's counters atomically over the
        previous checkpoint, streamed tensor by tensor (no second copy of the ~18 GB of a 1.5B run in host or
        GPU memory). Refuses a state holding an inf/NaN, so the last good checkpoint is never overwritten by
        poison. Returns the bytes written (0 on ranks > 0)."""
        if self.rank != 0:
            return 0
        bad = ckpt.nonfinite_names(self.policy.named_parameters())
        bad += [f"optimizer state {k}" for st in self.optimizer.state.values() for k, v in st.items()
                if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteLoss(f"step {self.state.step}: refusing to checkpoint a non-finite state "
                                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); {self._last_good()}")
        blob = {"step": self.state.step, "best": self.state.best,
                "model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
                "counters": {"reward_stats": self.scorer.stats.as_dict(), "wall_s": self._wall_s()}}
        nbytes = ckpt.save(blob, self.ckpt_path)
        self._ckpt_step = self.state.step
        log.info("checkpoint at step %d -> %s (%d bytes)", self.state.step, self.ckpt_path, nbytes)
        faults.hit("checkpoint")
        return nbytes

    def load_checkpoint(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        try:  # on the CPU, memory-mapped; each tensor goes to its parameter's device
            blob = ckpt.load(self.ckpt_path)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # written atomically: damaged since
            raise ckpt.RunError(f"cannot resume from {self.ckpt_path}: unreadable ({str(err).splitlines()[0]}); "
                                "restore it, or move it away to train from step 0") from err
        self.policy.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        ckpt.detach_from_file(self.optimizer)
        self.scheduler.load_state_dict(blob["scheduler"])
        ckpt.set_rng_state(blob["rng"])
        self.state = TrainState(blob["step"], blob["best"])
        counters = blob.get("counters", {})
        known = RewardStats.__dataclass_fields__  # a checkpoint of another version may lack or add a counter
        self.scorer.stats = RewardStats(**{k: v for k, v in counters.get("reward_stats", {}).items() if k in known})
        self._wall_before = counters.get("wall_s", 0.0)
        self._ckpt_step = self.state.step
        del blob
        self.generator.update_weights(self.policy)
        # rows logged after the checkpoint would be logged again: drop them (and a line torn by the kill)
        if self.rank == 0 and self.metrics_path.exists():
            rows = [r for r in read_jsonl(self.metrics_path, drop_torn_tail=True) if r["step"] <= self.state.step]
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for path in (self.ledger_path, self.val_records_path):
            if self.rank == 0 and path.exists():
                _trim_rows(path, self.state.step)
        dist.barrier()
        self.ledger = [r for r in read_jsonl(self.ledger_path) if r["step"] <= self.state.step] \
            if self.ledger_path.exists() else []
        log.info("resumed from %s at step %d", self.ckpt_path, self.state.step)
        return True

    def _last_good(self) -> str:
        if self._ckpt_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.ckpt_path} (step {self._ckpt_step})"

    def _wall_s(self) -> float:
        """Seconds of this trajectory's work: earlier attempts up to their last checkpoint, plus this one."""
        return self._wall_before + (time.time() - self._t0)

    def _prepare_dirs(self) -> None:
        """Rank 0, before any work: take the work dir's lock (a rerun never runs beside a killed run's
        leftover), finish or clean what interrupted writes left, and check permissions and free space."""
        if self.rank != 0:
            return
        ckpt.check_writable(self.work_dir, "checkpoint (work)")
        self._lock = ckpt.RunLock(self.work_dir).acquire()
        for folder in (self.work_dir, self.run_dir):
            clean_stale(folder)
        params = [p for p in self.policy.parameters()]
        policy_bytes = ckpt.tensor_bytes(params)
        # AdamW keeps two moments per parameter, in the parameter's dtype
        ckpt_bytes = policy_bytes + 2 * ckpt.tensor_bytes([p for p in params if p.requires_grad])
        ckpt.preflight(self.work_dir, self.run_dir, ckpt_bytes, policy_bytes)

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)
            if self.tensorboard is not None:
                self.tensorboard.log(row)

    # -- the loop -----------------------------------------------------------------------------------
    @dynamic_shape_attention()  # rollouts, the teacher and every micro-batch bring new attention shapes
    def fit(self, resume: bool = True) -> dict:
        cfg = self.cfg
        self._t0 = time.time()
        self._prepare_dirs()
        dist.barrier()
        if self.rank == 0:
            save_config(cfg, self.work_dir / "config.yaml")
            self.tensorboard = make_tensorboard(cfg.checkpoint.tensorboard, self.work_dir / "tensorboard")
        if not (resume and self.load_checkpoint()):
            if self.rank == 0:
                for path in (self.metrics_path, self.ledger_path, self.val_records_path):
                    path.unlink(missing_ok=True)
            self.ledger = []
            row = self.validate(0)
            self._log(row)
            counts = cfg.eval.best_includes_step0 or cfg.grpo.max_num_steps == 0  # (a 0-step run has no other)
            if counts and self._track_best(row, 0) and cfg.checkpoint.keep_best:
                self.save_policy(self.work_dir / "policy_best", 0, "best")
        steps = cfg.grpo.max_num_steps
        # a progress bar on a terminal; elsewhere (Snakemake logs, SLURM) one line per step
        terminal = is_terminal()
        bar = tqdm(range(self.state.step, steps), initial=self.state.step, total=steps,
                   disable=self.rank != 0 or not terminal, desc=cfg.run.method or "train", dynamic_ncols=True)
        for step in bar:
            row = self.train_step(step)
            self.state.step = step + 1
            self._log(row)
            if self.rank == 0 and not terminal:
                log.info("%s", step_line(row, steps))
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}", cliffs=row["cliffs"],
                            kept=row["privileged/kept"], jsd=f"{row['loss/jsd']:.4f}")
            if self.state.step % cfg.eval.val_period == 0 or self.state.step == steps:
                vrow = self.validate(self.state.step)
                vrow.update(self.probe_cliffs(self.state.step))
                self._log(vrow)
                log.info("step %d validation: %s", self.state.step,
                         {k: v for k, v in vrow.items() if k.startswith("val/pass") or k == "val/greedy_acc"})
                if self._track_best(vrow, self.state.step) and cfg.checkpoint.keep_best:
                    self.save_policy(self.work_dir / "policy_best", self.state.step, "best")
            if self.state.step % cfg.checkpoint.save_period == 0 or self.state.step == steps:
                self.save_checkpoint()
            dist.barrier()
        return self.finish(self._wall_s())

    def finish(self, wall_s: float) -> dict:
        """Publish the run's outputs into run_dir (what Snakemake declares), each complete or absent."""
        summary = {}
        if self.rank == 0:
            self.save_policy(self.run_dir / "policy_final", self.state.step, "final")
            best_src = self.work_dir / "policy_best"
            recover_dir(best_src)  # a swap cut short by a kill leaves `.policy_best.old`/`.ready`: finish it
            if best_src.exists():
                with atomic_dir(self.run_dir / "policy_best") as tmp:
                    shutil.copytree(best_src, tmp, dirs_exist_ok=True)
            elif self.cfg.checkpoint.keep_best:
                raise ckpt.RunError(f"{best_src} is missing although checkpoint.keep_best is on (no validation "
                                    f"gave a finite {self.cfg.checkpoint.best_metric}, or the folder was deleted)")
            rows = read_jsonl(self.metrics_path)
            val = [r for r in rows if r["kind"] == "val"]
            final = {k[4:]: v for k, v in val[-1].items() if k.startswith("val/")} if val else {}
            summary = {"run": self.run_dir.name, "method": self.cfg.run.method, "seed": self.cfg.seed,
                       "steps": self.state.step, "best": self.state.best,
                       "final": {"step": val[-1]["step"] if val else None, **final},
                       "best_checkpoint_metric": self.cfg.checkpoint.best_metric,
                       "best_checkpoint_step": self.state.best.get(self.cfg.checkpoint.best_metric, {}).get("step"),
                       "wall_s": round(wall_s, 1), "world_size": self.world,
                       "reward_stats": self.scorer.stats.as_dict(), "totals": _totals(rows)}
            with atomic_path(self.run_dir / "metrics.jsonl") as tmp:
                shutil.copyfile(self.metrics_path, tmp)
            ledger = read_jsonl(self.ledger_path, drop_torn_tail=True) if self.ledger_path.exists() else []
            write_jsonl(self.run_dir / "cliffs.jsonl", ledger)
            write_jsonl(self.run_dir / "val_problems.jsonl.gz",
                        read_jsonl(self.val_records_path, drop_torn_tail=True) if self.val_records_path.exists() else [])
            summary["cliff_ledger"] = cliff_ledger.summary(ledger)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_json(self.run_dir / "summary.json", summary)
        self.scorer.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._lock is not None:
            self._lock.release()
        return summary


def _totals(rows: list[dict]) -> dict:
    """Whole-run sums from the metrics rows (which survive resume exactly)."""
    train = [r for r in rows if r["kind"] == "train"]
    keys = ["tokens/generated", "tokens/grpo", "tokens/distill", "nonfinite_skipped", "time/step"]
    out = {k: sum(r.get(k) or 0 for r in train) for k in keys}
    out["time/eval"] = sum(r.get("time/eval") or 0 for r in rows if r["kind"] == "val")
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def _append_rows(path: Path, rows: list[dict]) -> None:
    """Append JSONL rows and flush (like metrics.jsonl: a killed run keeps what it wrote)."""
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
        fh.flush()


def _trim_rows(path: Path, step: int) -> None:
    """Drop rows written after the checkpoint's step (a resumed run writes them again); a torn last line (a
    kill mid-append) is dropped like metrics.jsonl's."""
    rows = [r for r in read_jsonl(path, drop_torn_tail=True) if r["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mean_times(times: dict) -> dict:
    names = ["rollout", "reward", "privileged", "privileged_reward", "teacher", "update", "step"]
    means = dist.sum_all([times.get(n, 0.0) for n in names])
    return {f"time/{n}": round(v / dist.world(), 3) for n, v in zip(names, means)}


def train(cfg: Config, data_dir, run_dir, work_dir, model_cache, resume: bool = True) -> dict:
    trainer = Trainer(cfg, data_dir, run_dir, work_dir, model_cache)
    with trainer.scorer:  # on an error the reward workers are killed, not left running
        return trainer.fit(resume=resume)
