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

from hdpo import distributed as dist
from hdpo import ledger as cliff_ledger
from hdpo.config import Config, method_name, save_config
from hdpo.data import Problem, build_messages, read_problems, render_prompt
from hdpo.evaluate import score_problems, summarise
from hdpo.generation import Sampling, make_generator
from hdpo.io import append_jsonl, atomic_dir, atomic_path, read_jsonl, write_json, write_jsonl
from hdpo.losses import grpo_token_loss_sum, leave_one_out_advantages, token_logprobs, topk_jsd
from hdpo.models import autocast, default_device, load_model, load_tokenizer, resolve_model
from hdpo.reward import RewardScorer
from hdpo.tracking import is_terminal, make_tensorboard, step_line

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
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
                 micro: int, tails: Optional[list] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k (logits, ids) per trajectory token; `tails`, if given, receives per trajectory the
    probability mass the cut leaves out at each token (for the cliff ledger)."""
    out = []
    for s in range(0, len(responses), micro):
        logits, _, _ = response_logits(teacher, priv_prompts[s:s + micro], responses[s:s + micro], pad_id)
        vals, ids = logits.float().topk(min(k, logits.shape[-1]), dim=-1)
        tail = cliff_ledger.tail_mass(logits, vals) if tails is not None else None
        for j, r in enumerate(responses[s:s + micro]):
            out.append((vals[j, :len(r)].cpu(), ids[j, :len(r)].cpu()))
            if tail is not None:
                tails.append(tail[j, :len(r)].cpu())
    return out


def accumulate_gradients(model, grpo: list[tuple[list[int], list[int], float]], distill: list[DistillItem],
                         n_grpo: float, n_distill: float, distill_weight: float, micro: int, pad_id: int,
                         clip_low: float, clip_high: float, old_logprobs: Optional[list[list[float]]] = None,
                         sampler_logprobs: Optional[list[list[float]]] = None, amp=contextlib.nullcontext) -> dict:
    """Backward of L_GRPO/N_grpo + lambda L_JSD/N_distill for this rank's share, micro-batch by micro-batch.

    `grpo` holds (prompt ids, response ids, advantage) of the rollouts with a non-zero advantage (the others
    contribute exactly zero loss and gradient, but their tokens count in the global `n_grpo`).
    `old_logprobs`: pi_old per token; None means on-policy (pi_old = the current weights, detached).
    `sampler_logprobs`: the generator's log-probs of the same tokens, to measure engine/trainer mismatch.
    Returns this rank's loss parts (already divided by the global counts) and the mismatch sums, for logging.
    """
    device = next(model.parameters()).device
    parts = {"grpo": 0.0, "jsd": 0.0, "mismatch_sum": 0.0, "mismatch_tokens": 0.0}
    for s in range(0, len(grpo), micro):
        chunk = grpo[s:s + micro]
        with amp():  # the forward in mixed precision; the loss math below in float32
            logits, mask, ids = response_logits(model, [c[0] for c in chunk], [c[1] for c in chunk], pad_id)
        lp = token_logprobs(logits, ids.unsqueeze(-1)).squeeze(-1)
        if old_logprobs is None:
            old = lp.detach()
        else:
            old = torch.zeros_like(lp)
            for j, o in enumerate(old_logprobs[s:s + micro]):
                old[j, :len(o)] = torch.tensor(o, dtype=old.dtype)
        if sampler_logprobs is not None:
            with torch.no_grad():
                for j, g in enumerate(sampler_logprobs[s:s + micro]):
                    diff = (lp[j, :len(g)].float() - torch.tensor(g, device=device)).abs()
                    parts["mismatch_sum"] += diff.sum().item()
                    parts["mismatch_tokens"] += len(g)
        adv = torch.tensor([c[2] for c in chunk], device=device)
        loss = grpo_token_loss_sum(lp, old, adv, mask, clip_low, clip_high) / n_grpo
        loss.backward()
        parts["grpo"] += loss.item()
    for s in range(0, len(distill), micro):
        chunk = distill[s:s + micro]
        with amp():
            logits, mask, _ = response_logits(model, [c.prompt_ids for c in chunk], [c.response_ids for c in chunk],
                                              pad_id)
        T, k = logits.shape[1], chunk[0].topk_ids.shape[-1]
        t_vals = torch.zeros(len(chunk), T, k)
        t_ids = torch.zeros(len(chunk), T, k, dtype=torch.long)
        for j, c in enumerate(chunk):
            t_vals[j, :len(c.response_ids)], t_ids[j, :len(c.response_ids)] = c.topk_logits, c.topk_ids
        student = token_logprobs(logits, t_ids.to(device))
        jsd = (topk_jsd(t_vals.to(device), student) * mask).sum() / n_distill
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
        self.policy = load_model(self.model_name, cfg.model.dtype, self.device, trainable=True)
        self.amp = lambda: autocast(self.device, cfg.model.dtype)
        self.policy.train()
        self.hdpo_on = cfg.hdpo.method == "hdpo" and cfg.hdpo.distill_weight > 0
        # The frozen teacher is the step-0 network, kept apart (re-loaded from the source on resume).
        self.frozen = None
        if self.hdpo_on and cfg.hdpo.teacher == "frozen":
            self.frozen = load_model(self.model_name, cfg.model.dtype, self.device).eval().requires_grad_(False)
        g = cfg.generation
        self.generator = make_generator(g.backend, self.policy, self.tok, g.batch_size,
                                        cfg.model.max_total_sequence_length, g.gpu_memory_utilization,
                                        cfg.model.dtype)
        self.priv_generator = self.generator
        if self.frozen is not None and cfg.hdpo.privileged_sampler == "teacher":
            self.priv_generator = make_generator(g.backend, self.frozen, self.tok, g.batch_size,
                                                 cfg.model.max_total_sequence_length, g.gpu_memory_utilization,
                                                 cfg.model.dtype)
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_factor(s, o.warmup_steps, o.warmup_start_factor))
        self.scorer = RewardScorer(cfg.eval.reward_workers, cfg.eval.reward_timeout_s)
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

        # 1. rollouts on the plain prompt
        with self.amp():
            groups = self.generator.generate([self._prompt(p) for p in problems], K, self.sampling)
        times["rollout"], t = time.time() - t, time.time()
        # 2. rewards and leave-one-out advantages
        flat = [r for g in groups for r in g]
        stats_before = self.scorer.stats.as_dict()
        rewards = torch.tensor(self.scorer.score([r.text for r in flat], [p.answer for p in problems for _ in range(K)]))
        rewards = rewards.view(len(problems), K)
        adv = leave_one_out_advantages(rewards, cfg.grpo.normalize_rewards, cfg.grpo.use_leave_one_out_baseline)
        times["reward"], t = time.time() - t, time.time()

        # 4. cliffs, capped globally per step
        n_cliffs_all = dist.gather(int((rewards.sum(-1) <= h.cliff_reward_sum).sum()))
        cliffs = select_cliffs(rewards, h.cliff_reward_sum, h.max_cliff_prompts_per_step, sum(n_cliffs_all[:self.rank]))
        # 5-6. privileged rollouts, R=1 filter, teacher top-k on the privileged context
        distill, generated, kept = [], 0, 0
        gen_per, kept_per, tail_per = {}, {}, {}  # per position in this rank's batch, for the cliff ledger
        n_grpo_local = sum(len(r.response_ids) for r in flat)  # GRPO's token normaliser (this rank's share)
        gen_tokens = n_grpo_local
        if self.hdpo_on and cliffs:
            M = cfg.privileged_rollouts
            cliff_problems = [problems[i] for i in cliffs]
            priv_prompts = [self._prompt(p, h.privileged_info) for p in cliff_problems]
            with self.amp():
                priv = self.priv_generator.generate(priv_prompts, M, self.sampling)
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
            times["privileged"], t = time.time() - t, time.time()
            if keep:
                plain_ids = {ci: self.tok(self._prompt(cliff_problems[ci]), add_special_tokens=False).input_ids
                             for ci, _ in keep}
                teacher = self.policy if self.frozen is None else self.frozen
                was = teacher.training
                teacher.eval()
                tails: list = []
                with self.amp():
                    tk = teacher_topk(teacher, [r.prompt_ids for _, r in keep], [r.response_ids for _, r in keep],
                                      h.topk_logits_k, self.pad_id, cfg.grpo.micro_batch_size, tails=tails)
                teacher.train(was)
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
                                     sampler_logprobs=[r.logprobs for r, _ in active], amp=self.amp)
        dist.sum_gradients([p for p in self.policy.parameters() if p.requires_grad])
        loss_grpo, loss_jsd = dist.sum_all([parts["grpo"], parts["jsd"]])
        loss = loss_grpo + h.distill_weight * loss_jsd
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"step {step + 1}: non-finite loss (grpo {loss_grpo}, jsd {loss_jsd}); "
                                f"the last good checkpoint is kept in {self.work_dir}")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.optimizer.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
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
                 stats_after["timeouts"] - stats_before["timeouts"], parts["mismatch_sum"], parts["mismatch_tokens"]]
        (rsum, rnum, nprob, ncliff, nsel, gen_all, kept_all, gen_tokens, pf, to, mm_sum, mm_tok) = dist.sum_all(local)
        return {
            "kind": "train", "step": step + 1,
            "loss/total": loss, "loss/grpo": loss_grpo, "loss/jsd": loss_jsd,
            "reward/mean": rsum / rnum, "cliffs": int(ncliff), "cliffs/distilled": int(nsel),
            "cliff_fraction": ncliff / nprob,
            "cliffs/reinjected": sum(r["reinjected_from"] is not None for r in ledger_rows),
            "privileged/generated": int(gen_all), "privileged/kept": int(kept_all),
            "teacher_pass_rate": kept_all / gen_all if gen_all else None,
            "tokens/grpo": int(n_grpo), "tokens/distill": int(n_distill), "tokens/generated": int(gen_tokens),
            "reward/parse_failures": int(pf), "reward/timeouts": int(to),
            "lr": lr, "grad_norm": float(grad_norm),
            # |log p_sampler - log p_trainer| on sampled tokens (rollouts with a non-zero advantage)
            "logprob/sampler_vs_trainer_abs_diff": mm_sum / mm_tok if mm_tok else None,
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
            _, records = score_problems(mine, self.generator, self.tok, self.scorer, self.cfg)
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
            _, records = score_problems(problems[self.rank::self.world], self.generator, self.tok, self.scorer, cfg)
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
            meta = {"run": self.run_dir.name, "method": method_name(self.cfg), "seed": self.cfg.seed,
                    "checkpoint": checkpoint, "model_step": step}
            (tmp / "hdpo_meta.json").write_text(json.dumps(meta, indent=2))

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        blob = {"step": self.state.step, "best": self.state.best,
                "model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(blob, tmp)
        log.info("checkpoint at step %d -> %s", self.state.step, self.ckpt_path)

    def load_checkpoint(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        blob = torch.load(self.ckpt_path, map_location=self.device, weights_only=False)
        self.policy.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        random.setstate(blob["rng"]["python"])
        np.random.set_state(blob["rng"]["numpy"])
        torch.set_rng_state(blob["rng"]["torch"])
        self.state = TrainState(blob["step"], blob["best"])
        self.generator.update_weights(self.policy)
        # rows logged after the checkpoint would be logged again: drop them
        if self.rank == 0 and self.metrics_path.exists():
            rows = [r for r in read_jsonl(self.metrics_path) if r["step"] <= self.state.step]
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

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)
            if self.tensorboard is not None:
                self.tensorboard.log(row)

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> dict:
        cfg, t0 = self.cfg, time.time()
        self.work_dir.mkdir(parents=True, exist_ok=True)
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
            if self._track_best(row, 0) and cfg.checkpoint.keep_best:
                self.save_policy(self.work_dir / "policy_best", 0, "best")
        steps = cfg.grpo.max_num_steps
        # a progress bar on a terminal; elsewhere (Snakemake logs, SLURM) one line per step
        terminal = is_terminal()
        bar = tqdm(range(self.state.step, steps), initial=self.state.step, total=steps,
                   disable=self.rank != 0 or not terminal, desc=method_name(cfg), dynamic_ncols=True)
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
        return self.finish(time.time() - t0)

    def finish(self, wall_s: float) -> dict:
        """Publish the run's outputs into run_dir (what Snakemake declares)."""
        summary = {}
        if self.rank == 0:
            self.save_policy(self.run_dir / "policy_final", self.state.step, "final")
            best_src = self.work_dir / "policy_best"
            if best_src.exists():
                with atomic_dir(self.run_dir / "policy_best") as tmp:
                    shutil.copytree(best_src, tmp, dirs_exist_ok=True)
            rows = read_jsonl(self.metrics_path)
            val = [r for r in rows if r["kind"] == "val"]
            final = {k[4:]: v for k, v in val[-1].items() if k.startswith("val/")} if val else {}
            summary = {"run": self.run_dir.name, "method": method_name(self.cfg), "seed": self.cfg.seed,
                       "steps": self.state.step, "best": self.state.best,
                       "final": {"step": val[-1]["step"] if val else None, **final},
                       "best_checkpoint_metric": self.cfg.checkpoint.best_metric,
                       "best_checkpoint_step": self.state.best.get(self.cfg.checkpoint.best_metric, {}).get("step"),
                       "wall_s": round(wall_s, 1), "world_size": self.world,
                       "reward_stats": self.scorer.stats.as_dict()}
            shutil.copyfile(self.metrics_path, self.run_dir / "metrics.jsonl")
            ledger = read_jsonl(self.ledger_path) if self.ledger_path.exists() else []
            write_jsonl(self.run_dir / "cliffs.jsonl", ledger)
            write_jsonl(self.run_dir / "val_problems.jsonl.gz",
                        read_jsonl(self.val_records_path) if self.val_records_path.exists() else [])
            summary["cliff_ledger"] = cliff_ledger.summary(ledger)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_json(self.run_dir / "summary.json", summary)
        self.scorer.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


def _append_rows(path: Path, rows: list[dict]) -> None:
    """Append JSONL rows and flush (like metrics.jsonl: a killed run keeps what it wrote)."""
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
        fh.flush()


def _trim_rows(path: Path, step: int) -> None:
    """Drop rows written after the checkpoint's step (a resumed run writes them again)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mean_times(times: dict) -> dict:
    names = ["rollout", "reward", "privileged", "teacher", "update", "step"]
    means = dist.sum_all([times.get(n, 0.0) for n in names])
    return {f"time/{n}": round(v / dist.world(), 3) for n, v in zip(names, means)}


def train(cfg: Config, data_dir, run_dir, work_dir, model_cache, resume: bool = True) -> dict:
    trainer = Trainer(cfg, data_dir, run_dir, work_dir, model_cache)
    return trainer.fit(resume=resume)
