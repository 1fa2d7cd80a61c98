"""What one training step hands from phase to phase (typed records), and what it measures on the way: seconds
per phase and the counts of a step, summed over ranks in one all-reduce into the metrics row."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from hdpo import distributed as dist
from hdpo import faults
from hdpo.data import Problem
from hdpo.generation import Rollout
from hdpo.update import DistillItem, UpdateParts

PHASES = ("rollout", "reward", "privileged", "privileged_reward", "teacher", "update")


# --- the records the phases pass on -------------------------------------------------------------------------

@dataclass
class Rollouts:
    """Steps 1-2: this rank's prompts, K rollouts each, their rewards [P, K] and advantages [P, K]."""
    problems: list[Problem]
    indices: list[int]  # into the train set
    reinjected_from: list[Optional[int]]  # the step a reinjected former cliff came from (expand-then-sharpen)
    groups: list[list[Rollout]]
    rewards: torch.Tensor
    advantages: torch.Tensor
    seeds: list[int]  # per prompt; its privileged rollouts draw from follow_seed(seed)
    privileged: dict[int, list[Rollout]]  # privileged rollouts decoded beside the rollouts, by prompt
    dropped: tuple[int, int] = (0, 0)  # speculative privileged rollouts started then dropped, and their tokens

    @property
    def flat(self) -> list[Rollout]:
        return [r for g in self.groups for r in g]


@dataclass
class Cliffs:
    """Step 4: prompts whose K rewards sum to at most the threshold. `selected`: positions in this rank's batch
    kept under the global per-step cap."""
    found: int
    selected: list[int]


@dataclass
class PrivilegedTargets:
    """Steps 5-6: the kept privileged rollouts with the teacher's top-k, and per cliff (position in this rank's
    batch) how many were generated and kept and the teacher's tail mass, for the cliff ledger."""
    distill: list[DistillItem] = field(default_factory=list)
    generated: dict[int, int] = field(default_factory=dict)
    kept: dict[int, int] = field(default_factory=dict)
    tails: dict[int, Optional[dict]] = field(default_factory=dict)
    tokens: int = 0  # privileged tokens decoded (kept or not)


@dataclass
class Update:
    """Step 7: the global loss, its parts, the gradient norm, whether the step was skipped (non-finite)."""
    loss: float
    loss_grpo: float
    loss_jsd: float
    grad_norm: float
    lr: float
    skipped: bool
    tokens_grpo: float
    tokens_distill: float
    parts: UpdateParts


# --- what a step measures -------------------------------------------------------------------------------------

class StepClock:
    """Wall seconds per phase of a step. The end of each phase is also a fault-injection point of its name
    (hdpo.faults; inert unless HDPO_FAULT is set)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._t = time.time()

    def end(self, phase: str, excluding: float = 0.0) -> None:
        """Close `phase`; `excluding` seconds inside it (e.g. scoring inside the decode loop) go to the next."""
        now = time.time()
        self.seconds[phase] += now - self._t - excluding
        self._t = now - excluding
        faults.hit(phase)


@dataclass
class StepTally:
    """One rank's counts for a step; `summed` adds them over ranks (one all-reduce, seconds included)."""
    reward_sum: float = 0.0
    rewards: float = 0.0
    prompts: float = 0.0
    cliffs: float = 0.0
    cliffs_distilled: float = 0.0
    privileged_generated: float = 0.0
    privileged_kept: float = 0.0
    tokens_generated: float = 0.0
    parse_failures: float = 0.0
    timeouts: float = 0.0
    timeouts_retried: float = 0.0
    gold_unparseable: float = 0.0
    errors: float = 0.0
    mismatch_sum: float = 0.0
    mismatch_tokens: float = 0.0
    dropped_rows: float = 0.0
    dropped_tokens: float = 0.0
    is_weight_sum: float = 0.0
    is_capped: float = 0.0
    is_units: float = 0.0
    seconds: dict = field(default_factory=dict)

    def summed(self) -> "StepTally":
        names = [f.name for f in fields(self) if f.name != "seconds"]
        phases = list(self.seconds)
        total = dist.sum_all([getattr(self, n) for n in names] + [self.seconds[p] for p in phases])
        return StepTally(**dict(zip(names, total)), seconds=dict(zip(phases, total[len(names):])))


def metrics_row(step: int, t: StepTally, u: Update, reinjected: int) -> dict:
    """The train row of metrics.jsonl from the step's counts summed over ranks."""
    mm_tok = t.mismatch_tokens
    return {
        "kind": "train", "step": step,
        "loss/total": u.loss, "loss/grpo": u.loss_grpo, "loss/jsd": u.loss_jsd,
        "reward/mean": t.reward_sum / t.rewards, "cliffs": int(t.cliffs), "cliffs/distilled": int(t.cliffs_distilled),
        "cliff_fraction": t.cliffs / t.prompts, "cliffs/reinjected": reinjected,
        "privileged/generated": int(t.privileged_generated), "privileged/kept": int(t.privileged_kept),
        "teacher_pass_rate": t.privileged_kept / t.privileged_generated if t.privileged_generated else None,
        "tokens/grpo": int(u.tokens_grpo), "tokens/distill": int(u.tokens_distill),
        "tokens/generated": int(t.tokens_generated),
        "tokens/privileged": int(t.tokens_generated - u.tokens_grpo),  # the privileged phase's share
        # hdpo.privileged_start=speculative: privileged rollouts started ahead and dropped (no cliff), and their
        # tokens (inside tokens/privileged and tokens/generated)
        "privileged/dropped": int(t.dropped_rows), "tokens/dropped": int(t.dropped_tokens),
        "reward/parse_failures": int(t.parse_failures), "reward/timeouts": int(t.timeouts),
        "reward/timeouts_retried": int(t.timeouts_retried),  # re-scored with eval.reward_retry_timeout_s
        # gold answers with nothing to verify against, and verifier errors: both score 0 (summary.json's totals)
        "reward/gold_unparseable": int(t.gold_unparseable), "reward/errors": int(t.errors),
        "lr": u.lr, "grad_norm": u.grad_norm if math.isfinite(u.grad_norm) else None,
        "nonfinite_skipped": int(u.skipped),
        # |log p_sampler - log p_trainer| on sampled tokens (rollouts with a non-zero advantage)
        "logprob/sampler_vs_trainer_abs_diff": t.mismatch_sum / mm_tok if mm_tok else None,
        # grpo.sampler_correction: the mean truncated importance weight (per token: over tokens; per sequence: over
        # the tokens, each weighted by its rollout's) and the fraction of tokens/rollouts the cap cut
        "sampler_correction/mean_weight": t.is_weight_sum / mm_tok if t.is_units and mm_tok else None,
        "sampler_correction/capped_fraction": t.is_capped / t.is_units if t.is_units else None,
        **{f"time/{p}": round(s / dist.world(), 3) for p, s in t.seconds.items()},
    }


class GroupScoring:
    """`Generator.generate_then`'s callbacks for one step. `then(i, group)` scores prompt i's K rollouts when the
    decode loop has them all, and names its privileged prompt if it is a cliff (when the privileged rollouts
    share the loop). Speculative: `ruled_out` scores single rollouts as they end; rewards are >= 0, so a partial
    sum above the threshold rules a cliff out at once. `seconds`: scoring time inside the decode loop."""

    def __init__(self, scorer, answers: list[str], k: int, threshold: float, privileged: Optional[list[str]],
                 speculative: bool = False):
        self.scorer, self.answers, self.k, self.threshold = scorer, answers, k, threshold
        self.privileged, self.speculative = privileged, speculative
        self.rewards: dict[int, list[float]] = {}
        self.seconds = 0.0
        self._partial: dict[int, dict[int, float]] = {}

    def ruled_out(self, done: list[tuple[int, int, Rollout]]) -> set[int]:
        t0 = time.time()
        got = self.scorer.score([r.text for _, _, r in done], [self.answers[i] for i, _, _ in done])
        self.seconds += time.time() - t0
        for (i, j, _), reward in zip(done, got):
            self._partial.setdefault(i, {})[j] = reward
        return {i for i, _, _ in done if sum(self._partial[i].values()) > self.threshold}

    def then(self, i: int, group: list[Rollout]) -> Optional[str]:
        t0 = time.time()
        self.rewards[i] = ([self._partial[i][j] for j in range(self.k)] if self.speculative
                           else self.scorer.score([r.text for r in group], [self.answers[i]] * self.k))
        self.seconds += time.time() - t0
        if self.privileged is not None and sum(self.rewards[i]) <= self.threshold:
            return self.privileged[i]
        return None
