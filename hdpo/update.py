"""The policy update of one step: the teacher's top-k targets, then the backward of

    L = L_GRPO / N_grpo + lambda * L_JSD / N_distill

micro-batch by micro-batch (PAPER.md steps 3, 6 and 7). Both counts are global (summed over ranks and
micro-batches), so the loss and its gradients do not depend on how a batch is split, packed or chunked.

- `MicroBatching`: how sequences are split (speed and memory, never the loss), one value for the whole run.
- `Objective`: the loss's settings (lambda, the ratio clip, the sampling temperature, the sampler correction).
- `GrpoItem` / `DistillItem`: a rollout with its advantage / a kept privileged rollout with its teacher top-k.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from hdpo.logprobs import (DEFAULT_CHUNK, chunked_token_logprobs, chunked_topk, chunked_topk_jsd, output_projection,
                           plan_micro_batches, response_hidden)
from hdpo.losses import grpo_token_loss_sum, sampler_correction_weights


@dataclass(frozen=True)
class MicroBatching:
    """At most `max_sequences` sequences and `token_budget` tokens per micro-batch, padded or packed into one
    row, log-probs from the hidden states `chunk` positions at a time (`hdpo.logprobs`)."""
    max_sequences: int
    token_budget: Optional[int] = None
    pack: bool = False
    chunk: int = DEFAULT_CHUNK
    pad_id: int = 0

    @classmethod
    def from_config(cls, grpo, pad_id: int) -> "MicroBatching":
        """From the `grpo` config section."""
        return cls(grpo.micro_batch_size, grpo.micro_batch_tokens, grpo.sequence_packing, grpo.logprob_chunk_size,
                   pad_id)

    def plan(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[int]]:
        """Indices of (prompt, response) pairs per micro-batch."""
        return plan_micro_batches([len(p) + len(r) for p, r in pairs], self.max_sequences, self.token_budget,
                                  self.pack)

    def hidden(self, model, prompts: list[list[int]], responses: list[list[int]]):
        """The final hidden states predicting each response token, flat, and those tokens."""
        return response_hidden(model, prompts, responses, self.pad_id, self.pack)


@dataclass(frozen=True)
class Objective:
    """The loss's settings. `temperature`: the sampling temperature; the trainer scores tokens with the
    distribution that sampled them. `correction`: grpo.sampler_correction ("none", "token", "sequence"),
    truncated importance weights pi_trainer / pi_sampler on the GRPO term, capped at `correction_cap`."""
    distill_weight: float
    clip_low: float = 0.2
    clip_high: float = 0.2
    temperature: float = 1.0
    correction: str = "none"
    correction_cap: float = 2.0

    @classmethod
    def from_config(cls, cfg, temperature: float) -> "Objective":
        g = cfg.grpo
        return cls(cfg.hdpo.distill_weight, g.ratio_clip_min, g.ratio_clip_max, temperature, g.sampler_correction,
                   g.sampler_correction_cap)


class GrpoItem(NamedTuple):
    """A rollout with a non-zero advantage. `sampler_logprobs`: the generator's log-probs of its tokens (to
    measure the engine/trainer mismatch and for the sampler correction); None when unknown."""
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    sampler_logprobs: Optional[list[float]] = None


@dataclass
class DistillItem:
    """A kept privileged rollout: the student's plain prompt, the tokens, and the teacher's top-k there."""
    prompt_ids: list[int]
    response_ids: list[int]
    topk_logits: torch.Tensor  # [T, k] the teacher's top-k logits (renormalised inside the JSD)
    topk_ids: torch.Tensor  # [T, k]


@dataclass
class UpdateParts:
    """This rank's share of the loss (already divided by the global counts) and the sampler diagnostics:
    |log p_sampler - log p_trainer| summed over `mismatch_tokens`, and the correction's weight sum, capped
    count and units (tokens or rollouts)."""
    grpo: float = 0.0
    jsd: float = 0.0
    mismatch_sum: float = 0.0
    mismatch_tokens: float = 0.0
    is_weight_sum: float = 0.0
    is_capped: float = 0.0
    is_units: float = 0.0


@torch.no_grad()
def teacher_topk(teacher, priv_prompts: list[list[int]], responses: list[list[int]], k: int, micro: MicroBatching,
                 temperature: float = 1.0, tails: Optional[list] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k of logits / temperature at each response token, per rollout ([T, k] values, ids),
    from its final hidden states in chunks of positions (no [tokens, vocab] tensor for the micro-batch).
    `tails`, if given, receives per rollout the probability mass the cut leaves out at each token (for the
    cliff ledger)."""
    weight, bias = output_projection(teacher)
    out: list = [None] * len(responses)
    tails_by: list = [None] * len(responses)
    for mb in micro.plan(list(zip(priv_prompts, responses))):
        hidden, _ = micro.hidden(teacher, [priv_prompts[i] for i in mb], [responses[i] for i in mb])
        vals, ids, *tail = chunked_topk(hidden, weight, bias, k, temperature, micro.chunk, with_tail=tails is not None)
        vals, ids, tail = vals.cpu(), ids.cpu(), [t.cpu() for t in tail]
        start = 0
        for i in mb:
            n = len(responses[i])
            out[i] = (vals[start:start + n], ids[start:start + n])
            if tail:
                tails_by[i] = tail[0][start:start + n]
            start += n
    if tails is not None:
        tails.extend(tails_by)
    return out


def accumulate_gradients(model, grpo: list[GrpoItem], distill: list[DistillItem], counts: tuple[float, float],
                         objective: Objective, micro: MicroBatching, amp=contextlib.nullcontext) -> UpdateParts:
    """Backward of L_GRPO / N_grpo + lambda L_JSD / N_distill for this rank's share, `counts` = (N_grpo,
    N_distill) the global token counts. `grpo` holds the rollouts with a non-zero advantage (the others add
    exactly zero loss and gradient, though their tokens count in N_grpo). On-policy: pi_old is the current
    weights, detached (one update per batch, as the paper)."""
    if objective.correction != "none" and any(g.sampler_logprobs is None for g in grpo):
        raise ValueError(f"sampler correction {objective.correction!r} needs the sampler's log-probs")
    parts = UpdateParts()
    for mb in micro.plan([(g.prompt_ids, g.response_ids) for g in grpo]):
        items = [grpo[i] for i in mb]
        if any(g.response_ids for g in items):  # else only empty responses (over-long prompts): nothing to score
            _grpo_backward(model, items, counts[0], objective, micro, amp, parts)
    for mb in micro.plan([(d.prompt_ids, d.response_ids) for d in distill]):
        items = [distill[i] for i in mb]
        if any(d.response_ids for d in items):
            _distill_backward(model, items, counts[1], objective, micro, amp, parts)
    return parts


def _grpo_backward(model, items: list[GrpoItem], n_grpo: float, objective: Objective, micro: MicroBatching, amp,
                   parts: UpdateParts) -> None:
    weight, bias = output_projection(model)
    with amp():  # the forward in mixed precision; the loss math below in float32 (or float64)
        hidden, ids = micro.hidden(model, [g.prompt_ids for g in items], [g.response_ids for g in items])
        lp = chunked_token_logprobs(hidden, weight, bias, ids[:, None], objective.temperature, micro.chunk).squeeze(-1)
    old = lp.detach()
    weights = _sampler_diagnostics(old, items, objective, parts)
    # one advantage per token (the flat layout has no padding, so the mask is all ones)
    adv = torch.tensor([g.advantage for g in items for _ in g.response_ids], dtype=lp.dtype, device=lp.device)
    loss = grpo_token_loss_sum(lp[:, None], old[:, None], adv, torch.ones_like(lp)[:, None], objective.clip_low,
                               objective.clip_high, None if weights is None else weights[:, None]) / n_grpo
    loss.backward()
    parts.grpo += loss.item()


def _sampler_diagnostics(old: torch.Tensor, items: list[GrpoItem], objective: Objective,
                         parts: UpdateParts) -> Optional[torch.Tensor]:
    """Adds the engine/trainer mismatch to `parts` (`old`: the trainer's detached log-probs of the tokens);
    returns the correction's weights per token (or None)."""
    if any(g.sampler_logprobs is None for g in items):
        return None
    lengths = [len(g.response_ids) for g in items]
    if [len(g.sampler_logprobs) for g in items] != lengths:
        raise ValueError("the sampler's log-probs do not cover the rollouts' tokens one to one")
    sampled = torch.tensor([x for g in items for x in g.sampler_logprobs], dtype=old.dtype, device=old.device)
    parts.mismatch_sum += (old - sampled).abs().sum().item()
    parts.mismatch_tokens += sampled.numel()
    if objective.correction == "none":
        return None
    weights, capped = sampler_correction_weights(old, sampled, lengths, objective.correction,
                                                 objective.correction_cap)
    parts.is_weight_sum += float(weights.sum())
    parts.is_capped += float(capped.sum())
    parts.is_units += capped.numel()
    return weights


def _distill_backward(model, items: list[DistillItem], n_distill: float, objective: Objective,
                      micro: MicroBatching, amp, parts: UpdateParts) -> None:
    weight, bias = output_projection(model)
    t_vals = torch.cat([d.topk_logits for d in items]).to(weight.device)
    t_ids = torch.cat([d.topk_ids for d in items]).to(weight.device)
    with amp():
        hidden, _ = micro.hidden(model, [d.prompt_ids for d in items], [d.response_ids for d in items])
        jsd = chunked_topk_jsd(hidden, weight, bias, t_ids, t_vals, objective.temperature, micro.chunk).sum() / n_distill
    (objective.distill_weight * jsd).backward()
    parts.jsd += jsd.item()
