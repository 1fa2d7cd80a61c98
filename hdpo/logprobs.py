"""Log-probs and the top-k JSD from a model's final hidden states, in chunks of positions.

The trainer never needs a [tokens, vocab] tensor for a whole micro-batch: it needs one log-prob per response
token (GRPO), k log-probs per distilled token (the JSD) and the teacher's top-k. So the output projection is
applied to `chunk` positions at a time, and each chunk runs under `torch.utils.checkpoint`, which keeps only
its inputs (a slice of the hidden states and the projection weight) and recomputes the chunk's logits in the
backward. The extra memory is a few [chunk, vocab] tensors instead of several [tokens, vocab] ones; the values
and gradients are those of `hdpo.losses.token_logprobs` / `topk_jsd` on the full logits.

Temperature: the logits are divided by the sampling temperature before the softmax, for the student and the
teacher alike, so the trainer scores tokens with the distribution that sampled them.

Micro-batches: `plan_micro_batches` groups sequences under a token budget (sorted by length, so rows of
similar length share padding); `response_hidden` runs one micro-batch padded (one row per sequence) or packed
(all sequences in one row, position ids restarting per sequence, no padding).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hdpo.losses import at_least_float32, topk_jsd

DEFAULT_CHUNK = 128  # positions per output-projection chunk: 128 x 151936 float32 logits = 74 MiB


# --- the model's pieces ----------------------------------------------------------------------------

def output_projection(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight (and bias) that turn final hidden states into logits."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM?)")
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"model config {key}={getattr(model.config, key)}: the chunked log-probs "
                                      "apply a plain linear output projection only")
    return head.weight, getattr(head, "bias", None)


def response_hidden(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict each response token, flat [N, H] in item order
    (N = the total response length), and the response tokens [N].

    Padded: one right-padded row per sequence; causal attention never reaches the padding that follows a
    sequence, so no attention mask is needed. Packed: one row of all sequences back to back, with position ids
    restarting at 0 per sequence and no attention mask, which transformers reads as packed sequences (each
    attends only within itself; tests/test_logprobs.py checks this against separate forwards).
    """
    device = next(model.parameters()).device
    seqs = [p + r for p, r in zip(prompts, responses)]
    if pack:
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None]
        pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        width, rows = ids.shape[1], [0] * len(seqs)
        offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)[:-1].tolist()
    else:
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        pos = torch.arange(width).expand(len(seqs), -1)
        rows, offsets = list(range(len(seqs))), [0] * len(seqs)
    index = torch.cat([torch.arange(o + len(p) - 1, o + len(p) + len(r) - 1) + row * width
                       for row, o, p, r in zip(rows, offsets, prompts, responses)])
    out = model.base_model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=None,
                           use_cache=False)
    hidden = out.last_hidden_state
    targets = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=device)
    return hidden.reshape(-1, hidden.shape[-1])[index.to(device)], targets


def response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Logits that predict each response token, [B, T, V], and the response mask [B, T].

    Prompts are left-padded and responses right-padded, so every response starts at the same column and
    position t of the result is aligned across two calls with different prompts (student: plain prompt;
    teacher: privileged prompt). Only the response region's logits are computed (`logits_to_keep`).

    The unchunked reference: the trainer never builds these [B, T, V] logits; the tests and
    scripts/benchmark.py hold the chunked path against them.
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


def plan_micro_batches(lengths: list[int], max_sequences: int, token_budget: Optional[int] = None,
                       pack: bool = False) -> list[list[int]]:
    """Indices of sequences per micro-batch, longest first: at most `max_sequences` per micro-batch and at
    most `token_budget` tokens as computed (padded: rows x the longest row; packed: the sum of lengths).
    A sequence longer than the budget gets a micro-batch of its own. The loss is a sum divided by global
    token counts, so any plan gives the same loss and gradients."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan: list[list[int]] = []
    for i in order:
        if plan:
            cur = plan[-1]
            n = len(cur) + 1
            cost = sum(lengths[j] for j in cur) + lengths[i] if pack else n * lengths[cur[0]]
            if n <= max_sequences and (token_budget is None or cost <= token_budget):
                cur.append(i)
                continue
        plan.append([i])
    return plan


# --- chunked math ------------------------------------------------------------------------------------

def _logits(h, weight, bias, temperature):
    logits = at_least_float32(F.linear(h, weight, bias))
    return logits / temperature if temperature != 1.0 else logits


def _chunk_logprobs(h, weight, bias, ids, temperature):
    logits = _logits(h, weight, bias, temperature)
    return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)


def _chunk_jsd(h, weight, bias, ids, t_vals, temperature):
    return topk_jsd(t_vals, _chunk_logprobs(h, weight, bias, ids, temperature))


def _chunks(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _run(fn, h, weight, *args):
    """One chunk: under checkpoint when a gradient is wanted (its logits are recomputed in the backward)."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return checkpoint(fn, h, weight, *args, use_reentrant=False)
    return fn(h, weight, *args)


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           ids: torch.Tensor, temperature: float = 1.0, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias) / temperature)[ids]: hidden [N, H], ids [N, n] -> [N, n]."""
    parts = [_run(_chunk_logprobs, hidden[s:e], weight, bias, ids[s:e], temperature)
             for s, e in _chunks(hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(ids.shape, dtype=torch.float32)


def chunked_topk_jsd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     teacher_topk_ids: torch.Tensor, teacher_topk_vals: torch.Tensor, temperature: float = 1.0,
                     chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Per-position `topk_jsd` of the teacher's top-k against the student's logits from `hidden`, [N]."""
    parts = [_run(_chunk_jsd, hidden[s:e], weight, bias, teacher_topk_ids[s:e], teacher_topk_vals[s:e], temperature)
             for s, e in _chunks(hidden.shape[0], chunk)]
    return torch.cat(parts) if parts else hidden.new_zeros(hidden.shape[0], dtype=torch.float32)


@torch.no_grad()
def chunked_topk(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                 temperature: float = 1.0, chunk: int = DEFAULT_CHUNK, with_tail: bool = False):
    """The top-k of (logits / temperature) per position, values float32 [N, k] and ids [N, k]; with `with_tail`
    also the probability mass the cut leaves out, 1 - sum of softmax over the top-k, [N]."""
    vals, ids, tails = [], [], []
    for s, e in _chunks(hidden.shape[0], chunk):
        logits = _logits(hidden[s:e], weight, bias, temperature)
        v, i = logits.topk(min(k, logits.shape[-1]), dim=-1)
        vals.append(v)
        ids.append(i)
        if with_tail:
            tails.append((1.0 - torch.exp(torch.logsumexp(v, -1) - torch.logsumexp(logits, -1))).clamp_min(0.0))
    if not vals:
        empty = (hidden.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long, device=hidden.device))
        return (*empty, hidden.new_zeros(0, dtype=torch.float32)) if with_tail else empty
    if with_tail:
        return torch.cat(vals), torch.cat(ids), torch.cat(tails)
    return torch.cat(vals), torch.cat(ids)
