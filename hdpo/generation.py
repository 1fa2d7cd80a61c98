"""Sampling rollouts: one interface, backends behind it.

The trainer only sees `Generator.generate(prompts, n, sampling) -> rollouts per prompt` and
`Generator.update_weights(model)` after each optimizer step. The transformers backend samples from the live
policy module on CPU (so its weights are always current), and on GPU from a bf16 copy that `update_weights`
refreshes; a vLLM backend keeps its own copy of the weights and must reload them in `update_weights`.

What is sampled (both backends): exactly softmax(logits / temperature), cut to the top-p nucleus when
top_p < 1, and nothing else: no repetition penalty, top-k, n-gram ban or any other setting a checkpoint's
`generation_config.json` may carry. `Rollout.logprobs` are log_softmax(logits / temperature) of the sampled
tokens, the distribution the trainer's log-probs use (before the top-p cut; the paper's top_p is 1).

Seeds: every sample draws from its own random stream, a pure function of (the prompt's seed, the sample's
index). `generate(..., seeds=...)` gives one seed per prompt (evaluation: from (seed, benchmark, problem),
`problem_seed`); without seeds they are drawn from torch's RNG, which the trainer seeds per step and rank.
So which tokens a sample gets does not depend on the batch it shares, the batch size, the job order, the
number of ranks or the device, up to float round-off in the forward (a draw moves only when round-off swaps
its two best Gumbel-perturbed scores: rare; the noise is a counter-based hash of the seed, the same on every
device: hdpo.decode). `Generator.generate_then` adds follow-up rollouts whose seeds are the prompt's too.
"""
from __future__ import annotations

import hashlib
import logging
from copy import deepcopy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from hdpo.decode import Decoded, Request, decode
from hdpo.models import disable_activation_checkpointing, eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    greedy: bool = False


@dataclass
class Rollout:
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including EOS when `finished`
    logprobs: list[float]  # the sampling model's log_softmax(logits / temperature) at response_ids
    text: str  # decoded response, special tokens skipped
    finished: bool  # stopped at EOS (else cut at max_new_tokens)

    @classmethod
    def cut(cls, prompt_ids: Sequence[int], response_ids: Sequence[int] = (), logprobs: Sequence[float] = ()):
        """A rollout that never ran to its end: a prompt with no room left, or a row dropped as not needed."""
        return cls(list(prompt_ids), list(response_ids), list(logprobs), "", False)


def warn_no_room(prompt_lengths: list[int], max_total_length: int) -> None:
    """One warning per call for the prompts that left no room to generate (their rollouts are empty)."""
    if prompt_lengths:
        log.warning("%d rollout(s) of prompts of %d-%d tokens are empty: no room under "
                    "model.max_total_sequence_length=%d", len(prompt_lengths), min(prompt_lengths),
                    max(prompt_lengths), max_total_length)


@dataclass
class Speculation:
    """Follow-ups started before their prompt's rollouts are done (`Generator.generate_then`'s `speculate`).

    `asks[i]` is the follow-up prompt that prompt i would get (HDPO: its privileged prompt, should it be a
    cliff); its m follow-ups start at once beside the rollouts instead of after them, so the two no longer
    take one decoding step after the other: fewer steps, more rows per step. `ruled_out(finished)` gets each
    batch of finished rollouts as (prompt, sample, rollout) and returns the prompts whose follow-ups are no
    longer needed (HDPO: a correct rollout means no cliff): those stop at once; so do those of a prompt whose
    `then` returns None; `then` may only return asks[i]. The rows start at once when the batch has room for
    all of them (generation.batch_size >= prompts x (n + m)); else they wait behind the rollouts. Backends
    that cannot stop rows run the two phases one after the other instead (the same samples either way, up to
    float round-off). The backend fills in what the dropped follow-ups cost."""
    asks: dict[int, str]
    ruled_out: Callable[[list[tuple[int, int, "Rollout"]]], Iterable[int]]
    dropped_rows: int = 0  # follow-ups started and dropped (dropped from the queue: not counted, nothing spent)
    dropped_tokens: int = 0  # tokens decoded for them


class Generator:
    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        """n samples per prompt; `seeds`: one per prompt (see the module docstring), None: from torch's RNG."""
        raise NotImplementedError

    def update_weights(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step with the updated policy."""

    def generate_then(self, prompts: list[str], n: int, sampling: Sampling,
                      then: Callable[[int, list[Rollout]], Optional[str]], m: int,
                      seeds: Optional[list[int]] = None, speculate: Optional[Speculation] = None
                      ) -> tuple[list[list[Rollout]], dict[int, list[Rollout]]]:
        """n rollouts per prompt, and m rollouts of a follow-up prompt for each prompt i where `then(i, its
        rollouts)` returns one (HDPO: the privileged prompt of a cliff). Returns (the groups, {i: follow-ups}).
        A prompt's follow-ups draw from its second seed (`follow_seed`), so which prompts get follow-ups, and
        when, changes no sample. This default runs the two phases one after the other, `speculate` or not; the
        transformers backend overlaps them (same samples)."""
        seeds = prompt_seeds(seeds, len(prompts))
        groups = self.generate(prompts, n, sampling, seeds)
        if speculate is not None:  # every rollout goes to ruled_out before its group to `then`, as when speculating
            speculate.ruled_out([(i, j, r) for i, g in enumerate(groups) for j, r in enumerate(g)])
        asks = {i: q for i, g in enumerate(groups) if (q := then(i, g)) is not None}
        keys = sorted(asks)
        more = self.generate([asks[i] for i in keys], m, sampling,
                             [follow_seed(seeds[i]) for i in keys]) if keys else []
        return groups, dict(zip(keys, more))


# --- seeds ------------------------------------------------------------------------------------------------

def stream_seed(*parts) -> int:
    """A 31-bit seed from ints and strings (strings hashed with sha256: stable across processes, unlike hash())."""
    ints = []
    for part in parts:
        if isinstance(part, str):
            ints.extend(np.frombuffer(hashlib.sha256(part.encode()).digest()[:16], dtype=np.uint32).tolist())
        else:
            ints.append(int(part) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(ints).generate_state(1)[0]) & 0x7FFFFFFF


def problem_seed(seed: int, benchmark: str, problem_id: str) -> int:
    """The seed of one problem's samples in evaluation and validation."""
    return stream_seed(seed, benchmark, str(problem_id))


def prompt_seeds(seeds: Optional[list[int]], num_prompts: int) -> list[int]:
    """One seed per prompt: `seeds` checked, or drawn from torch's RNG (seeded by the trainer per step and rank)."""
    if seeds is None:
        seeds = torch.randint(0, 2**31 - 1, (num_prompts,)).tolist()
    if len(seeds) != num_prompts:
        raise ValueError(f"{len(seeds)} seeds for {num_prompts} prompts")
    return list(seeds)


def sample_seeds(seeds: Optional[list[int]], num_prompts: int, n: int) -> list[int]:
    """One seed per sample, prompt-major (sample j of prompt i at i * n + j)."""
    return [stream_seed(s, j) for s in prompt_seeds(seeds, num_prompts) for j in range(n)]


def follow_seed(seed: int) -> int:
    """The seed of a prompt's follow-up rollouts (`Generator.generate_then`), apart from its own samples'."""
    return stream_seed(seed, "follow-up")


class TransformersGenerator(Generator):
    """The transformers backend: `hdpo.decode.decode`, continuous batching of up to `batch_size` rows.

    Speed on GPU: when the policy keeps float32 master weights and the config's dtype is bf16/fp16, sampling
    runs on a copy of the policy in that dtype (no autocast casts per decoding step; 2.5x the tokens/s of the
    float32 module under autocast at batch 256), refreshed by `update_weights` after every optimizer step.
    Prompts are queued longest first, so rows that share a step have similar lengths; each sample keeps its
    own seed, so the order changes no draw. A prompt that leaves no room under `max_total_length` gets an
    empty, unfinished rollout and a warning (as the vLLM backend does), never the run killed.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int, max_total_length: int,
                 dtype: Optional[str] = None):
        self.tok = tokenizer
        self.batch_size, self.max_total_length = batch_size, max_total_length
        self.model = generation_copy(model, dtype)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def update_weights(self, model: torch.nn.Module) -> None:
        if self.model is model:
            return  # sampling from the live module: always current
        with torch.no_grad():
            mine = dict(self.model.named_parameters())
            for name, p in model.named_parameters():
                mine[name].copy_(p)  # cast into the copy's dtype in place

    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        groups, _ = self.generate_then(prompts, n, sampling, lambda i, g: None, 0, seeds)
        return groups

    def generate_ids(self, prompt_ids: list[list[int]], sampling: Sampling,
                     seeds: Optional[list[int]] = None) -> list[Rollout]:
        """One rollout per prompt (token ids), in the order given; `seeds`: one per rollout (None: from torch)."""
        seeds = sample_seeds(seeds, len(prompt_ids), 1) if seeds is None else seeds
        return self._run([(list(p), s) for p, s in zip(prompt_ids, seeds)], sampling)

    def generate_then(self, prompts, n, sampling, then, m, seeds=None, speculate=None):
        """As `Generator.generate_then`, in one decode loop: a prompt's follow-ups are queued as soon as its n
        rollouts are done (with `speculate`: at once, behind the rollouts), and share decoding steps with the
        rollouts still running."""
        seeds = prompt_seeds(seeds, len(prompts))
        ids = self.tok(prompts, add_special_tokens=False).input_ids
        jobs = [(ids[i], stream_seed(s, j)) for i, s in enumerate(seeds) for j in range(n)]  # job i * n + j
        owner: list[int] = []  # the prompt of each follow-up job (numbered from len(jobs) on)
        ended: dict[int, Rollout] = {}  # a prompt's plain rollouts, until its group is complete
        ahead: dict[int, list[int]] = {}  # a prompt's speculative follow-up jobs, while they may be needed
        dropped: set[int] = set()

        def follow_jobs(i: int, q: str) -> list[tuple[list[int], int]]:
            q_ids = self.tok(q, add_special_tokens=False).input_ids
            owner.extend([i] * m)
            return [(q_ids, stream_seed(follow_seed(seeds[i]), j)) for j in range(m)]

        def drop(i: int) -> list[int]:
            dropped.update(ahead.get(i, []))
            return ahead.pop(i, [])

        def on_done(done: list[tuple[int, Rollout]]) -> tuple[list[tuple[list[int], int]], list[int]]:
            more, stop = [], []
            plain = [(job, r) for job, r in done if job < len(jobs)]  # not a follow-up
            if speculate is not None and plain:
                for i in set(speculate.ruled_out([(job // n, job % n, r) for job, r in plain])):
                    stop += drop(i)
            for job, r in plain:
                ended[job] = r
                i = job // n
                if all(i * n + j in ended for j in range(n)):
                    q = then(i, [ended.pop(i * n + j) for j in range(n)])
                    if speculate is None:
                        more += follow_jobs(i, q) if q is not None else []
                    elif q is None:
                        stop += drop(i)
                    elif i not in ahead or q != speculate.asks.get(i):
                        raise RuntimeError(f"prompt {i}: then() asks for follow-ups ({q[:60]!r}) that were not "
                                           "started ahead, or were dropped as ruled out")
                    else:
                        ahead.pop(i)  # needed: they run to the end
            return more, stop

        first = []
        if speculate is not None:
            for i, q in sorted(speculate.asks.items()):
                ahead[i] = list(range(len(jobs) + len(first), len(jobs) + len(first) + m))
                first += follow_jobs(i, q)
        out = self._run(jobs, sampling, on_done, first)
        follow: dict[int, list[Rollout]] = {}
        for job, (i, r) in enumerate(zip(owner, out[len(jobs):]), start=len(jobs)):
            if job in dropped:
                speculate.dropped_rows += bool(r.response_ids)  # a started row has decoded a token
                speculate.dropped_tokens += len(r.response_ids)
            else:
                follow.setdefault(i, []).append(r)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))], dict(sorted(follow.items()))

    @torch.no_grad()
    def _run(self, jobs: list[tuple[list[int], int]], s: Sampling, on_done=None,
             later: Sequence[tuple[list[int], int]] = ()) -> list[Rollout]:
        """Rollouts of (prompt ids, seed) jobs, then of the `later` ones (queued behind them, numbered after them);
        `on_done(list of (job, rollout))` returns (more jobs, jobs to drop: their rollouts keep what was decoded
        until then)."""
        jobs = list(jobs)
        out: dict[int, Rollout] = {}
        order: list[int] = []  # the job of each of decode's requests, in decode's order
        request_of: dict[int, int] = {}  # and back
        over_long: list[int] = []
        stopped: set[int] = set()  # dropped jobs: an over-long one among them needs no warning

        def too_long(job: int) -> bool:
            p = jobs[job][0]
            if len(p) < self.max_total_length:
                return False
            over_long.append(job)
            out[job] = Rollout.cut(p)
            return True

        def request(job: int) -> Request:
            p, seed = jobs[job]
            request_of[job] = len(order)
            order.append(job)
            return Request(p, min(s.max_new_tokens, self.max_total_length - len(p)), seed)

        def settle(rolls: list[tuple[int, Rollout]]) -> tuple[list[int], list[int]]:
            """Tell `on_done`: (its new jobs that need decoding, the jobs it drops). An over-long new job is done at
            once: tell again."""
            new, stop = [], []
            while rolls and on_done is not None:
                (added, dropped), rolls = on_done(rolls), []
                stop += dropped
                stopped.update(dropped)
                for p, seed in added:
                    jobs.append((list(p), seed))
                    if too_long(len(jobs) - 1):
                        rolls.append((len(jobs) - 1, out[len(jobs) - 1]))
                    else:
                        new.append(len(jobs) - 1)
            return new, stop

        def finished(done: list[tuple[int, Decoded]]) -> tuple[list[Request], list[int]]:
            rolls = []
            for k, d in done:
                job = order[k]
                out[job] = Rollout(list(jobs[job][0]), d.response_ids, d.logprobs,
                                   self.tok.decode(d.response_ids, skip_special_tokens=True), d.finished)
                rolls.append((job, out[job]))
            new, stop = settle(rolls)
            return [request(j) for j in new], [request_of[j] for j in stop if j in request_of]  # not: over-long

        by_length = lambda js: sorted(js, key=lambda j: -len(jobs[j][0]))  # noqa: E731 (stable: groups stay together)
        first = len(jobs)
        jobs += [(list(p), seed) for p, seed in later]
        short = [j for j in range(len(jobs)) if not too_long(j)]
        new, stop = settle([(j, out[j]) for j in range(len(jobs)) if j in out])  # over-long prompts: done already
        for j in set(stop).difference(out):
            out[j] = Rollout.cut(jobs[j][0])  # dropped before it started
        short = [j for j in short if j not in out]
        requests = [request(j) for j in by_length([j for j in short if j < first])]  # length buckets
        requests += [request(j) for j in by_length([j for j in short if j >= first]) + new]
        with eval_mode(self.model):
            results = decode(self.model, requests, s.temperature, s.top_p, s.greedy, self.batch_size, self.eos_ids,
                             self.pad_id, finished)
        for k, d in enumerate(results):
            if d.dropped:  # what a dropped job decoded before it stopped
                out[order[k]] = Rollout.cut(jobs[order[k]][0], d.response_ids, d.logprobs)
        warn_no_room([len(jobs[j][0]) for j in over_long if j not in stopped], self.max_total_length)
        return [out[j] for j in range(len(jobs))]


def generation_copy(model: torch.nn.Module, dtype: Optional[str], devices: tuple[str, ...] = ("cuda",)
                    ) -> torch.nn.Module:
    """A frozen copy of `model` in `dtype` when `model` holds float32 weights on one of `devices` (CPU bf16
    matmuls are slow, so CPU samples from the float32 module); else `model` itself."""
    half = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "")
    param = next(model.parameters())
    if half is None or param.device.type not in devices or param.dtype != torch.float32:
        return model
    grads = [p.grad for p in model.parameters()]
    for p in model.parameters():
        p.grad = None  # not copied along
    try:
        copy = deepcopy(model)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
    disable_activation_checkpointing(copy)  # a sampler never backwards (H100, batch 256: 7.2k -> 8.4k tokens/s)
    # Only the weights are cast. `module.to(bf16)` would also round the float32 buffers, RoPE's inverse
    # frequencies among them (0.25% off: the rotary angle at position 4096 moves by up to 0.7 rad), and the
    # sampler would then encode positions other than the trainer's and the frozen teacher's.
    for p in copy.parameters():  # each tied weight once
        p.data = p.data.to(half)
    return copy.requires_grad_(False).eval()


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a response (both backends): the checkpoint's generation config's, and the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
