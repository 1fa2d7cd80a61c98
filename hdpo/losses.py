"""The math of HDPO, as pure tensor functions (no I/O, no model).

- `leave_one_out_advantages`: GRPO advantages from a group's binary rewards (PAPER.md step 2).
- `grpo_token_loss_sum`: the PPO-clipped surrogate summed over tokens; the caller divides by the global
  token count, so the loss does not depend on how a batch is split over ranks or micro-batches (step 3).
- `sampler_correction_weights`: truncated importance weights pi_trainer / pi_sampler for the GRPO term, per
  token or per rollout (off in the paper; NeMo-RL, TRL and verl offer it against sampler/trainer mismatch).
- `topk_jsd`: the 1/2-weighted Jensen-Shannon divergence between the teacher's top-k distribution
  (truncated, renormalised) and the student's full distribution, with the closed-form tail (step 6).
"""
from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 up to float32 for the loss math; float64 stays (the invariance tests run in it, so any CPU
    passes them)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def leave_one_out_advantages(rewards: torch.Tensor, normalize: bool = True, leave_one_out: bool = True,
                             eps: float = 1e-6, std: str = "nemo_rl") -> torch.Tensor:
    """rewards [G, K] -> advantages [G, K].

    Baseline of rollout i: the mean of the other K-1 rewards of its group (`leave_one_out`) or of all K.
    With `normalize` (NeMo-RL's `normalize_rewards`) the difference is divided by std + eps where std > 0 and
    left unscaled where std = 0, with std, by `std`:
      "nemo_rl": the unbiased std of the same rewards the baseline averages (the other K-1 with
        `leave_one_out`, else all K), as NeMo-RL's `calculate_baseline_and_std_per_prompt`
        (nemo_rl/algorithms/utils.py) and its GRPO advantage step;
      "group": the unbiased std of all K rewards of the group for every rollout (this repo's rule before
        NeMo-RL's was adopted).
    A group with equal rewards gets exactly zero advantages either way: the cliff that HDPO fills in.
    """
    if std not in ("nemo_rl", "group"):
        raise ValueError(f"advantage std rule {std!r} is not 'nemo_rl' or 'group'")
    r = rewards.to(torch.float64)  # the moments below subtract nearly equal numbers
    k = r.shape[-1]
    total, total_sq = r.sum(-1, keepdim=True), (r * r).sum(-1, keepdim=True)
    if leave_one_out:
        n = k - 1
        mean, mean_sq = (total - r) / n, (total_sq - r * r) / n
    else:
        n = k
        mean, mean_sq = total.expand_as(r) / n, total_sq.expand_as(r) / n
    adv = r - mean
    if normalize:
        if std == "group":
            sd = r.std(-1, keepdim=True).expand_as(r)
        elif n > 1:  # Bessel's correction over the n rewards the baseline uses
            sd = ((mean_sq - mean * mean).clamp_min(0.0) * (n / (n - 1))).sqrt()
        else:  # one other reward: no spread to measure (NeMo-RL's nan_to_num(0)), advantage unscaled
            sd = torch.zeros_like(r)
        sd = torch.where(sd > 1e-12, sd, torch.zeros_like(sd))  # round-off of an all-equal set is 0
        adv = torch.where(sd > 0, adv / (sd + eps), adv)
    return adv.to(torch.float32)


def grpo_token_loss_sum(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over valid tokens of -w min(r A, clip(r, 1-eps_lo, 1+eps_hi) A), r = exp(logp - logp_old).

    logprobs/old_logprobs/mask: [B, T]; advantages: [B] (one per sequence, broadcast over its tokens);
    weights: [B, T] detached per-token weights (`sampler_correction_weights`), None = 1.
    Divide the result by the number of valid tokens of the *whole* batch (all ranks, all micro-batches).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(-1).to(logprobs.dtype)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv)
    if weights is not None:
        surrogate = surrogate * weights.detach().to(surrogate.dtype)
    return -(surrogate * mask).sum()


def sampler_correction_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                               lengths: list[int], mode: str, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights of the sampled tokens, min(pi_trainer / pi_sampler, cap), detached.

    trainer_logprobs / sampler_logprobs: [N] log-probs of the same tokens, sequences laid end to end with
    `lengths` tokens each. mode "token": one weight per token; "sequence": one per sequence, the ratio of its
    probabilities (exp of the summed log-ratio), repeated over its tokens; "none": all ones. Returns the
    per-token weights [N] and, per unit weighted (token or sequence), whether the cap cut it (a bool tensor).
    """
    log_ratio = (trainer_logprobs.detach() - sampler_logprobs.detach()).to(torch.float64)
    if mode == "none":
        return torch.ones_like(log_ratio, dtype=trainer_logprobs.dtype), torch.zeros(0, dtype=torch.bool)
    if sum(lengths) != log_ratio.numel():
        raise ValueError(f"{log_ratio.numel()} log-probs for sequences of {sum(lengths)} tokens")
    if mode == "token":
        unit = log_ratio
    elif mode == "sequence":
        unit = torch.stack([part.sum() for part in torch.split(log_ratio, lengths)]) if lengths else log_ratio
    else:
        raise ValueError(f"sampler correction mode {mode!r} is not none, token or sequence")
    capped = unit > math.log(cap)
    w = torch.exp(unit.clamp_max(math.log(cap)))
    if mode == "sequence":
        w = torch.repeat_interleave(w, torch.tensor(lengths, dtype=torch.long))
    return w.to(trainer_logprobs.dtype), capped


def topk_jsd(teacher_topk_logprobs: torch.Tensor, student_logprobs_at_topk: torch.Tensor) -> torch.Tensor:
    """Per-position JSD_k between the truncated teacher and the full student, [..., k] -> [...].

    teacher_topk_logprobs: the teacher's log-probs of its k most likely tokens (any normalisation: they are
      renormalised over the k tokens here, which is the truncation). No gradient flows into them.
    student_logprobs_at_topk: the student's full-vocabulary log-probs, gathered at the teacher's top-k ids.

    With P the truncated teacher, Q the student, M = (P+Q)/2:
      JSD = 1/2 KL(P||M) + 1/2 KL(Q||M)
          = 1/2 sum_top-k [P log(P/M) + Q log(Q/M)] + 1/2 * Q_rest * ln 2,
    because outside the top-k set P = 0, so M = Q/2 there and Q log(Q/M) = Q ln 2 (Q_rest = 1 - sum_top-k Q).
    The paper writes the tail as Q_rest * ln 2; we keep the standard 1/2 weighting, so JSD <= ln 2.
    """
    log_p = torch.log_softmax(at_least_float32(teacher_topk_logprobs.detach()), dim=-1)
    log_q = at_least_float32(student_logprobs_at_topk)
    log_m = torch.logaddexp(log_p, log_q) - LN2
    p, q = log_p.exp(), log_q.exp()
    inside = p * (log_p - log_m) + q * (log_q - log_m)
    q_rest = (1.0 - q.sum(-1)).clamp_min(0.0)
    return 0.5 * inside.sum(-1) + 0.5 * q_rest * LN2


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax: logits [..., V], ids [..., n]."""
    logits = at_least_float32(logits)
    return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)
