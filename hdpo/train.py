"""HDPO training (the paper's Algorithm 1), GRPO when lambda = 0. `Trainer.train_step` runs one step as phases:

  sample_rollouts     K rollouts per prompt on the plain prompt, math-verify rewards, leave-one-out advantages
  find_cliffs         prompts whose K rewards sum to 0, at most `max_cliff_prompts_per_step` over all ranks
  privileged_targets  M privileged rollouts per cliff (problem + ground truth), those with reward 1 kept, and
                      the teacher's top-k on the privileged context (drifting: current weights; frozen: step 0)
  update              L = L_GRPO / N_grpo + lambda * L_JSD / N_distill (hdpo/update.py), both counts summed
                      over ranks and micro-batches; AdamW (warm-up, weight decay, grad-norm clip)
  record              the cliff ledger's rows and the metrics row (hdpo/step_records.py)

Runs as one process or under torchrun (gradients are summed over ranks, so every rank's loss is already
divided by the global token count). Checkpoints (model, optimizer, scheduler, RNG, step, best-so-far) are
written atomically to the work dir, which is not a Snakemake output, and `resume` continues the trajectory.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import platform
import random
import shutil
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
from hdpo import retention
from hdpo.config import Config, save_config
from hdpo.data import Problem, build_messages, read_problems, render_prompt
from hdpo.evaluate import score_problems, summarise
from hdpo.generation import Rollout, Sampling, Speculation, follow_seed, prompt_seeds
from hdpo.generators import make_generator
from hdpo.io import append_jsonl, atomic_dir, atomic_path, clean_stale, read_jsonl, recover_dir, write_json, write_jsonl
from hdpo.losses import leave_one_out_advantages
from hdpo.model_card import config_digest, validation_numbers, write_model_card
from hdpo.models import (autocast, default_device, dynamic_shape_attention, eval_mode, load_model, load_tokenizer,
                         resolve_model)
from hdpo.reward import RewardScorer, RewardStats
from hdpo.step_records import (Cliffs, GroupScoring, PrivilegedTargets, Rollouts, StepClock, StepTally, Update,
                               metrics_row)
from hdpo.tracking import RunInfo, Trackers, is_terminal, open_trackers, step_line
from hdpo.tracking import run_end
from hdpo.update import DistillItem, GrpoItem, MicroBatching, Objective, accumulate_gradients, teacher_topk

log = logging.getLogger(__name__)
WORK_LOG = "train.log"  # in the work dir: every attempt of one trajectory, appended


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
        self.policy = load_model(self.model_name, cfg.model.dtype, self.device, trainable=True,
                                 activation_checkpointing=cfg.model.activation_checkpointing)
        self.amp = lambda: autocast(self.device, cfg.model.dtype)
        # how the update and the teacher forward split their sequences (speed and memory, never the loss)
        self.micro = MicroBatching.from_config(cfg.grpo, self.tok.pad_token_id)
        self.policy.train()
        self.hdpo_on = cfg.hdpo.distill_weight > 0  # lambda = 0 is GRPO
        # The frozen teacher is the step-0 network, kept apart (re-loaded from the source on resume).
        self.frozen = None
        if self.hdpo_on and cfg.hdpo.teacher == "frozen":
            self.frozen = load_model(self.model_name, cfg.model.dtype, self.device).eval().requires_grad_(False)
        self.generator, self.priv_generator = self._make_generators()
        # One decode loop runs the rollouts and the cliffs' privileged rollouts when the policy samples both and
        # the cap cannot cut the cliffs (cap >= prompts per step, the paper's setting): fixed for the run.
        self.overlap = (self.hdpo_on and self.priv_generator is self.generator
                        and cfg.hdpo.max_cliff_prompts_per_step >= cfg.grpo.num_prompts_per_step)
        self._warn_if_speculation_is_limited()
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_factor(s, o.warmup_steps, o.warmup_start_factor))
        self.scorer = RewardScorer(cfg.eval.reward_workers, cfg.eval.reward_timeout_s,
                                   retry_timeout_s=cfg.eval.reward_retry_timeout_s)
        self.scorer.start()  # workers warm up while the models load
        g = cfg.generation
        self.sampling = Sampling(g.temperature, g.top_p, g.max_new_tokens or cfg.model.max_total_sequence_length)
        self.objective = Objective.from_config(cfg, self.sampling.temperature)
        self.state = TrainState()
        self.metrics_path = self.work_dir / "metrics.jsonl"
        self.ledger_path = self.work_dir / "cliffs.jsonl"  # the cliff ledger (hdpo/ledger.py)
        self.val_records_path = self.work_dir / "val_problems.jsonl"  # per-problem validation results
        self.ledger: list[dict] = []  # every rank keeps it: expand-then-sharpen reads it to draw batches
        self.trackers: Optional[Trackers] = None  # rank 0 only
        self.ckpt_path = self.work_dir / "checkpoint.pt"
        self._t0, self._wall_before, self._ckpt_step, self._locks = time.time(), 0.0, None, []

    def _make_generators(self):
        """The policy's generator, and the one that samples privileged rollouts (the frozen teacher's with
        hdpo.privileged_sampler=teacher, else the same)."""
        cfg, g = self.cfg, self.cfg.generation
        generator = make_generator(g.backend, self.policy, self.tok, g.batch_size,
                                   cfg.model.max_total_sequence_length, g.gpu_memory_utilization,
                                   cfg.model.dtype, g.vllm_cpu_kv_cache_gib)
        if self.frozen is None or cfg.hdpo.privileged_sampler != "teacher":
            return generator, generator
        return generator, make_generator(g.backend, self.frozen, self.tok, g.batch_size,
                                         cfg.model.max_total_sequence_length, g.gpu_memory_utilization,
                                         cfg.model.dtype, g.vllm_cpu_kv_cache_gib)

    def _warn_if_speculation_is_limited(self) -> None:
        cfg, g = self.cfg, self.cfg.generation
        if not (self.hdpo_on and cfg.hdpo.privileged_start == "speculative"):
            return
        if not self.overlap or g.backend != "transformers":
            log.warning("hdpo.privileged_start=speculative needs the transformers backend, the policy sampling "
                        "the privileged rollouts and a cliff cap >= prompts per step: they start after the "
                        "rollouts")
        elif g.batch_size < cfg.grpo.num_prompts_per_step // self.world * (cfg.grpo.num_generations_per_prompt
                                                                            + cfg.privileged_rollouts):
            log.warning("hdpo.privileged_start=speculative: generation.batch_size=%d has no room for every "
                        "prompt's rollouts and privileged rollouts at once, so the privileged ones wait behind "
                        "the rollouts (fewer decoding steps saved)", g.batch_size)

    # -- prompts ------------------------------------------------------------------------------------
    def _prompt(self, p: Problem, privileged: Optional[str] = None) -> str:
        return render_prompt(self.tok, build_messages(p, self.cfg.data.system_prompt, privileged))

    def _batch_slots(self, step: int) -> tuple[list[int], list[Optional[int]]]:
        """This rank's share of the step's prompts (train-set indices) and, for a reinjected former cliff, the
        step it came from."""
        B = self.cfg.grpo.num_prompts_per_step
        idx = batch_indices(step, B, len(self.train_set), self.cfg.seed)
        origins: list = [None] * len(idx)
        delay = self.cfg.hdpo.reinject_cliffs_after_steps
        if delay is not None:  # expand-then-sharpen: former cliffs take the last slots, a function of the ledger
            cap = self.cfg.hdpo.reinject_max_per_step or max(1, B // 4)
            idx, origins = cliff_ledger.place_reinjections(
                idx, cliff_ledger.due_reinjections(self.ledger, step + 1, delay, cap))
        mine = slice(self.rank * (B // self.world), (self.rank + 1) * (B // self.world))
        return idx[mine], origins[mine]

    # -- one step of Algorithm 1 --------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """Rollouts and rewards -> cliffs -> privileged targets on the cliffs -> GRPO + lambda JSD update ->
        the cliff ledger and the metrics row."""
        seed_everything(self.cfg.seed, step, self.rank)
        clock, stats_before = StepClock(), self.scorer.stats.as_dict()
        batch = self.sample_rollouts(step, clock)
        cliffs = self.find_cliffs(batch)
        targets = self.privileged_targets(batch, cliffs, clock)
        update = self.update(batch, targets, clock)
        return self.record(step + 1, batch, cliffs, targets, update, clock, stats_before)

    def sample_rollouts(self, step: int, clock: StepClock) -> Rollouts:
        """Steps 1-2: K rollouts per prompt on the plain prompt, math-verify rewards, leave-one-out advantages.
        With self.overlap one decode loop also runs the cliffs' privileged rollouts, each starting as soon as its
        prompt's K rollouts are scored (or at once with hdpo.privileged_start=speculative): the same samples as
        the two phases one after the other (Generator.generate_then)."""
        cfg, h, K = self.cfg, self.cfg.hdpo, self.cfg.grpo.num_generations_per_prompt
        indices, origins = self._batch_slots(step)
        problems = [self.train_set[i] for i in indices]
        privileged = [self._prompt(p, h.privileged_info) for p in problems] if self.overlap else None
        speculative = self.overlap and h.privileged_start == "speculative"
        scoring = GroupScoring(self.scorer, [p.answer for p in problems], K, h.cliff_reward_sum, privileged,
                               speculative)
        speculate = Speculation(dict(enumerate(privileged)), scoring.ruled_out) if speculative else None
        seeds = prompt_seeds(None, len(problems))  # from torch's RNG, seeded per (seed, step, rank)
        with self.amp():
            groups, early = self.generator.generate_then([self._prompt(p) for p in problems], K, self.sampling,
                                                         scoring.then, cfg.privileged_rollouts, seeds, speculate)
        clock.end("rollout", excluding=scoring.seconds)  # the scoring inside the loop counts as the reward phase
        rewards = torch.tensor([scoring.rewards[i] for i in range(len(problems))], dtype=torch.float32)
        adv = leave_one_out_advantages(rewards, cfg.grpo.normalize_rewards, cfg.grpo.use_leave_one_out_baseline,
                                       std=cfg.grpo.advantage_std)
        clock.end("reward")
        dropped = (speculate.dropped_rows, speculate.dropped_tokens) if speculate is not None else (0, 0)
        return Rollouts(problems, indices, origins, groups, rewards, adv, seeds, early, dropped)

    def find_cliffs(self, batch: Rollouts) -> Cliffs:
        """Step 4: prompts whose K rewards sum to at most hdpo.cliff_reward_sum, capped globally per step."""
        h = self.cfg.hdpo
        found = dist.gather(int((batch.rewards.sum(-1) <= h.cliff_reward_sum).sum()))
        return Cliffs(found[self.rank], select_cliffs(batch.rewards, h.cliff_reward_sum, h.max_cliff_prompts_per_step,
                                                      sum(found[:self.rank])))

    def privileged_targets(self, batch: Rollouts, cliffs: Cliffs, clock: StepClock) -> PrivilegedTargets:
        """Steps 5-6: M privileged rollouts per cliff (problem + its answer), those with reward >= the filter kept,
        and the teacher's top-k over their tokens on the privileged context (drifting: the current weights;
        frozen: step 0's)."""
        out = PrivilegedTargets()
        if not (self.hdpo_on and cliffs.selected):
            return out
        h, M = self.cfg.hdpo, self.cfg.privileged_rollouts
        problems = [batch.problems[i] for i in cliffs.selected]
        if self.overlap:
            assert sorted(batch.privileged) == cliffs.selected, (sorted(batch.privileged), cliffs.selected)
            groups = [batch.privileged[i] for i in cliffs.selected]
        else:
            with self.amp():
                groups = self.priv_generator.generate([self._prompt(p, h.privileged_info) for p in problems], M,
                                                      self.sampling, [follow_seed(batch.seeds[i]) for i in cliffs.selected])
        clock.end("privileged")  # generation and math-verify apart: LaTeX-heavy answers can make scoring the slow part
        rollouts = [(c, r) for c, g in zip(cliffs.selected, groups) for r in g]
        rewards = self.scorer.score([r.text for _, r in rollouts], [p.answer for p in problems for _ in range(M)])
        keep = [(c, r) for (c, r), reward in zip(rollouts, rewards) if reward >= h.teacher_min_reward]
        out.tokens = sum(len(r.response_ids) for _, r in rollouts)
        out.generated = dict.fromkeys(cliffs.selected, M)
        for c, _ in keep:
            out.kept[c] = out.kept.get(c, 0) + 1
        clock.end("privileged_reward")
        if keep:
            out.distill, out.tails = self._teacher_targets(batch, keep)
        clock.end("teacher")
        return out

    def _teacher_targets(self, batch: Rollouts, keep: list[tuple[int, Rollout]]):
        """DistillItems (the student's plain prompt, the tokens, the teacher's top-k) and the teacher's tail mass
        per cliff."""
        h = self.cfg.hdpo
        plain = {c: self.tok(self._prompt(batch.problems[c]), add_special_tokens=False).input_ids for c, _ in keep}
        teacher = self.policy if self.frozen is None else self.frozen
        tails: list = []
        with self.amp(), eval_mode(teacher):
            topk = teacher_topk(teacher, [r.prompt_ids for _, r in keep], [r.response_ids for _, r in keep],
                                h.topk_logits_k, self.micro, self.sampling.temperature, tails=tails)
        by_prompt: dict = {}
        for (c, _), tail in zip(keep, tails):
            by_prompt.setdefault(c, []).append(tail)
        tail_mass = {c: cliff_ledger.tail_summary(torch.cat(ts).tolist()) for c, ts in by_prompt.items()}
        return [DistillItem(plain[c], r.response_ids, vals, ids) for (c, r), (vals, ids) in zip(keep, topk)], tail_mass

    def update(self, batch: Rollouts, targets: PrivilegedTargets, clock: StepClock) -> Update:
        """Steps 3, 6, 7: the backward of L_GRPO / N_grpo + lambda L_JSD / N_distill (both counts summed over
        ranks), gradients summed over ranks and clipped, then AdamW; a non-finite loss or gradient norm skips the
        step or stops the run before the weights are touched (optimizer.on_nonfinite)."""
        n_grpo, n_distill = dist.sum_all([sum(len(r.response_ids) for r in batch.flat),
                                          sum(len(d.response_ids) for d in targets.distill)])
        grpo = [GrpoItem(r.prompt_ids, r.response_ids, a, r.logprobs)
                for r, a in zip(batch.flat, batch.advantages.flatten().tolist()) if a != 0.0]
        # Zero tensors, not None: every rank all-reduces the same tensors (a rank may have nothing to backward),
        # and a step with no signal is the same optimizer step on 1 or N ranks.
        for p in self.policy.parameters():
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
        parts = accumulate_gradients(self.policy, grpo, targets.distill, (max(n_grpo, 1.0), max(n_distill, 1.0)),
                                     self.objective, self.micro, self.amp)
        dist.sum_gradients([p for p in self.policy.parameters() if p.requires_grad])
        loss_grpo, loss_jsd = dist.sum_all([parts.grpo, parts.jsd])
        loss = loss_grpo + self.objective.distill_weight * loss_jsd
        faults.at_gradients(self.policy.parameters())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.optimizer.max_grad_norm))
        skipped = self._skip_nonfinite(loss, loss_grpo, loss_jsd, grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the step number, skipped or not
        if not skipped:
            self.generator.update_weights(self.policy)
        clock.end("update")
        return Update(loss, loss_grpo, loss_jsd, grad_norm, lr, skipped, n_grpo, n_distill, parts)

    def _skip_nonfinite(self, loss: float, loss_grpo: float, loss_jsd: float, grad_norm: float) -> bool:
        """Checked before the optimizer: one inf/NaN would poison the weights and AdamW's moments for good."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return False
        what = (f"non-finite loss {loss} (grpo {loss_grpo}, jsd {loss_jsd})" if not math.isfinite(loss)
                else f"non-finite gradient norm {grad_norm} (loss {loss})")
        if self.cfg.optimizer.on_nonfinite != "skip":
            raise NonFiniteLoss(f"step {self.state.step + 1}: {what}: stopped before the optimizer step; "
                                f"{self._last_good()}; optimizer.on_nonfinite=skip skips such steps")
        log.warning("step %d: %s: step skipped (no update)", self.state.step + 1, what)
        return True

    def record(self, step: int, batch: Rollouts, cliffs: Cliffs, targets: PrivilegedTargets, update: Update,
               clock: StepClock, stats_before: dict) -> dict:
        """The cliff ledger's rows for the step's prompts (every rank's) and the metrics row."""
        rows = cliff_ledger.step_rows(step, batch.indices, [p.id for p in batch.problems], batch.rewards.tolist(),
                                      self.cfg.hdpo.cliff_reward_sum, cliffs.selected, targets.generated,
                                      targets.kept, batch.reinjected_from, targets.tails)
        rows = [r for part in dist.gather(rows) for r in part]
        self.ledger.extend(rows)
        if self.rank == 0:
            _append_rows(self.ledger_path, rows)
        stats, parts = self.scorer.stats.as_dict(), update.parts
        tally = StepTally(
            reward_sum=float(batch.rewards.sum()), rewards=float(batch.rewards.numel()), prompts=len(batch.problems),
            cliffs=float(cliffs.found), cliffs_distilled=len(cliffs.selected),
            privileged_generated=sum(targets.generated.values()), privileged_kept=sum(targets.kept.values()),
            # every decoded token counts, speculative ones dropped too
            tokens_generated=sum(len(r.response_ids) for r in batch.flat) + batch.dropped[1] + targets.tokens,
            parse_failures=stats["parse_failures"] - stats_before["parse_failures"],
            timeouts=stats["timeouts"] - stats_before["timeouts"],
            timeouts_retried=stats["timeouts_retried"] - stats_before["timeouts_retried"],
            gold_unparseable=stats["gold_unparseable"] - stats_before["gold_unparseable"],
            errors=stats["errors"] - stats_before["errors"],
            mismatch_sum=parts.mismatch_sum, mismatch_tokens=parts.mismatch_tokens,
            dropped_rows=batch.dropped[0], dropped_tokens=batch.dropped[1],
            is_weight_sum=parts.is_weight_sum, is_capped=parts.is_capped, is_units=parts.is_units,
            seconds={**clock.seconds, "step": sum(clock.seconds.values())})
        return metrics_row(step, tally.summed(), update, sum(r["reinjected_from"] is not None for r in rows))

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
        with ckpt.disk_full_as_run_error("the policy", dest, "the previous copy and the checkpoint are kept"), \
                atomic_dir(dest) as tmp:
            self.policy.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
            faults.hit("policy")
            meta = {"run": self.run_dir.name, "method": self.cfg.run.method, "seed": self.cfg.seed,
                    "checkpoint": checkpoint, "model_step": step, "config_digest": config_digest(self.cfg)}
            (tmp / "hdpo_meta.json").write_text(json.dumps(meta, indent=2))
            records = read_jsonl(self.val_records_path, drop_torn_tail=True) if self.val_records_path.exists() else []
            write_model_card(tmp, self.cfg, meta, validation_numbers(records, step, self.cfg.eval.pass_k))

    def save_checkpoint(self) -> int:
        """Write model, optimizer, scheduler, RNG, step, best-so-far and the run's counters atomically over the
        previous checkpoint, streamed tensor by tensor (no second copy of the ~18 GB of a 1.5B run in host or
        GPU memory). Refuses a state holding an inf/NaN, so the last good checkpoint is never overwritten by
        poison. Returns the bytes written (0 on ranks > 0)."""
        if self.rank != 0:
            return 0
        bad = ckpt.nonfinite_training_state(self.policy, self.optimizer)
        if bad:
            raise NonFiniteLoss(f"step {self.state.step}: refusing to checkpoint a non-finite state "
                                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); {self._last_good()}")
        nbytes = ckpt.save_training_state(self.ckpt_path, self.state.step, self.state.best, self.policy,
                                          self.optimizer, self.scheduler,
                                          {"reward_stats": self.scorer.stats.as_dict(), "wall_s": self._wall_s()})
        self._ckpt_step = self.state.step
        log.info("checkpoint at step %d -> %s (%d bytes)", self.state.step, self.ckpt_path, nbytes)
        faults.hit("checkpoint")
        return nbytes

    def load_checkpoint(self) -> bool:
        """Resume from the work dir's checkpoint, verified first: its sha256 against the one written with it,
        then finite weights and optimizer states (a damaged file is refused, never trained on)."""
        if not self.ckpt_path.exists():
            return False
        if not ckpt.verify(self.ckpt_path):
            log.warning("%s has no sha256 beside it (written by an older version): resuming unverified",
                        self.ckpt_path)
        try:  # on the CPU, memory-mapped; each tensor goes to its parameter's device
            blob = ckpt.load(self.ckpt_path)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # written atomically: damaged since
            raise ckpt.RunError(f"cannot resume from {self.ckpt_path}: unreadable ({str(err).splitlines()[0]}); "
                                "restore it, or move it away to train from step 0") from err
        self.policy.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        ckpt.detach_from_file(self.optimizer)
        bad = ckpt.nonfinite_training_state(self.policy, self.optimizer)
        if bad:
            raise ckpt.CorruptCheckpoint(f"cannot resume from {self.ckpt_path}: it holds non-finite values "
                                         f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); restore it, "
                                         "or move it away to train from step 0")
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
        for path in (self.metrics_path, self.ledger_path, self.val_records_path):
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
        ckpt.check_writable(self.run_dir, "run output")
        # one trainer per work dir, and per run dir (two runs publishing into one folder would mix their files)
        try:
            self._locks = [ckpt.RunLock(self.work_dir).acquire(), ckpt.RunLock(self.run_dir).acquire()]
        except ckpt.RunError as err:
            raise ckpt.RunError(f"{err} (its log: {self.work_dir / WORK_LOG})") from None
        self._attach_work_log()
        for folder in (self.work_dir, self.run_dir):
            clean_stale(folder)
        params = [p for p in self.policy.parameters()]
        source = Path(self.model_name)  # a saved policy also holds the tokenizer and config files
        extras = sum(ckpt.folder_bytes(f) for f in source.iterdir()
                     if f.suffix not in (".safetensors", ".bin", ".gguf", ".pt")) if source.is_dir() else 0
        weight_bytes = ckpt.tensor_bytes(params)
        policy_bytes = weight_bytes + extras
        # AdamW keeps two moments per parameter, in the parameter's dtype
        ckpt_bytes = weight_bytes + 2 * ckpt.tensor_bytes([p for p in params if p.requires_grad])
        existing = ckpt.folder_bytes(self.ckpt_path) + ckpt.folder_bytes(self.work_dir / "policy_best")
        ckpt.preflight(self.work_dir, self.run_dir, ckpt_bytes, policy_bytes, existing_bytes=existing)

    def _log(self, row: dict) -> None:
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)
            self.trackers.log(row)

    def _open_trackers(self, resumed: bool, fresh: bool) -> None:
        """Rank 0: the configured trackers, reopening this work dir's tracker runs unless `fresh`; resumed, a
        backend is first given the rows of metrics.jsonl it lacks (all of them when it was just added)."""
        cfg = self.cfg
        names = list(cfg.tracking.backends) + (["tensorboard"] if cfg.checkpoint.tensorboard else [])
        info = RunInfo(self.run_dir.name, cfg.run.method or "train", cfg.seed, cfg.to_dict(), self.work_dir)
        self.trackers = open_trackers(names, info, cfg.tracking, fresh)
        if resumed:
            for row in read_jsonl(self.metrics_path):
                self.trackers.log(row)

    # -- the loop -----------------------------------------------------------------------------------
    @dynamic_shape_attention()  # rollouts, the teacher and every micro-batch bring new attention shapes
    def fit(self, resume: bool = True) -> dict:
        cfg = self.cfg
        self._t0 = time.time()
        self._prepare_dirs()
        dist.barrier()
        if self.rank == 0:
            save_config(cfg, self.work_dir / "config.yaml")
        resumed = resume and self.load_checkpoint()
        if self.rank == 0:  # a run started over (no --resume) starts new tracker runs too
            self._open_trackers(resumed, fresh=not resume)
        if not resumed:
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
                dest = self.run_dir / "policy_best"
                with ckpt.disk_full_as_run_error("the policy", dest, f"{best_src} is kept"), atomic_dir(dest) as tmp:
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
                       "reward_stats": self.scorer.stats.as_dict(), "totals": _totals(rows),
                       "work_dir": str(self.work_dir)}  # where its trajectory lives (hdpo clean)
            with atomic_path(self.run_dir / "metrics.jsonl") as tmp:
                shutil.copyfile(self.metrics_path, tmp)
            ledger = read_jsonl(self.ledger_path, drop_torn_tail=True) if self.ledger_path.exists() else []
            write_jsonl(self.run_dir / "cliffs.jsonl", ledger)
            write_jsonl(self.run_dir / "val_problems.jsonl.gz",
                        read_jsonl(self.val_records_path, drop_torn_tail=True) if self.val_records_path.exists() else [])
            summary["cliff_ledger"] = cliff_ledger.summary(ledger)
            save_config(self.cfg, self.run_dir / "config.yaml")
            write_json(self.run_dir / "summary.json", summary)
            self.trackers.log_end(summary, {"validation": run_end.validation_table(rows)},
                                  {"curves": run_end.curves(rows, self.run_dir.name)})
            self.trackers.close()
        self.scorer.close()
        if self.rank == 0 and not self.cfg.checkpoint.keep_finished_state:
            freed = retention.free_finished_state(self.work_dir)
            log.info("checkpoint.keep_finished_state is off: freed %s of resumable state in %s (the policies are "
                     "published; a rerun of this run trains from step 0)", retention.human(freed), self.work_dir)
        for lock in self._locks:
            lock.release()
        return summary

    def _attach_work_log(self) -> None:
        """Every log line also goes to <work dir>/train.log, appended across resumes: the whole trajectory in one
        place, which only the lock's holder writes (Snakemake deletes a job's `log:` file before it starts the
        job, also when the trainer then refuses to run beside a live one)."""
        handler = logging.FileHandler(self.work_dir / WORK_LOG, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self._work_log = handler
        log.info("pid %d on %s: this trajectory's log is %s", os.getpid(), platform.node(), handler.baseFilename)

    def detach_work_log(self) -> None:
        handler = getattr(self, "_work_log", None)
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
            self._work_log = None


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
    try:
        rows = [r for r in read_jsonl(path, drop_torn_tail=True) if r["step"] <= step]
    except ValueError as err:  # damaged inside, not a torn last line: the run's record cannot be trusted as is
        raise ckpt.RunError(f"{err}; repair or delete that row (rows after step {step}, the checkpoint's, are "
                            f"written again on resume), or move {path.parent} away to train from step 0") from None
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def train(cfg: Config, data_dir, run_dir, work_dir, model_cache, resume: bool = True) -> dict:
    trainer = None
    try:
        trainer = Trainer(cfg, data_dir, run_dir, work_dir, model_cache)
        with trainer.scorer:  # on an error the reward workers are killed, not left running
            return trainer.fit(resume=resume)
    except KeyboardInterrupt:  # Ctrl-C: where it stopped and how to go on, not a traceback
        where = (f"during step {trainer.state.step + 1}; {trainer._last_good()}" if trainer is not None
                 else "before training started")
        raise ckpt.RunError(f"interrupted {where}: rerun the same command (with --resume) to continue") from None
    finally:
        if trainer is not None:
            trainer.detach_work_log()
