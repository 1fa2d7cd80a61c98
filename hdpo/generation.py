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
from typing import Callable, Optional

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


class Generator:
    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        """n samples per prompt; `seeds`: one per prompt (see the module docstring), None: from torch's RNG."""
        raise NotImplementedError

    def update_weights(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step with the updated policy."""

    def generate_then(self, prompts: list[str], n: int, sampling: Sampling,
                      then: Callable[[int, list[Rollout]], Optional[str]], m: int,
                      seeds: Optional[list[int]] = None) -> tuple[list[list[Rollout]], dict[int, list[Rollout]]]:
        """n rollouts per prompt, and m rollouts of a follow-up prompt for each prompt i where `then(i, its
        rollouts)` returns one (HDPO: the privileged prompt of a cliff). Returns (the groups, {i: follow-ups}).
        A prompt's follow-ups draw from its second seed (`follow_seed`), so which prompts get follow-ups, and
        when, changes no sample. This default runs the two phases one after the other; the transformers backend
        overlaps them (same samples)."""
        seeds = prompt_seeds(seeds, len(prompts))
        groups = self.generate(prompts, n, sampling, seeds)
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
        self.eos_ids = _eos_ids(model, tokenizer)
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

    def generate_then(self, prompts, n, sampling, then, m, seeds=None):
        """As `Generator.generate_then`, in one decode loop: a prompt's follow-ups are queued as soon as its n
        rollouts are done, and share decoding steps with the rollouts still running."""
        seeds = prompt_seeds(seeds, len(prompts))
        ids = self.tok(prompts, add_special_tokens=False).input_ids
        jobs = [(ids[i], stream_seed(s, j)) for i, s in enumerate(seeds) for j in range(n)]  # job i * n + j
        owner: list[int] = []  # the prompt of each follow-up job (numbered from len(jobs) on)
        ended: dict[int, Rollout] = {}  # a prompt's plain rollouts, until its group is complete

        def on_done(done: list[tuple[int, Rollout]]) -> list[tuple[list[int], int]]:
            more = []
            for job, r in done:
                if job >= len(jobs):
                    continue  # a follow-up
                ended[job] = r
                i = job // n
                if all(i * n + j in ended for j in range(n)):
                    q = then(i, [ended.pop(i * n + j) for j in range(n)])
                    if q is not None:
                        q_ids = self.tok(q, add_special_tokens=False).input_ids
                        more += [(q_ids, stream_seed(follow_seed(seeds[i]), j)) for j in range(m)]
                        owner.extend([i] * m)
            return more

        out = self._run(jobs, sampling, on_done)
        follow: dict[int, list[Rollout]] = {}
        for i, r in zip(owner, out[len(jobs):]):
            follow.setdefault(i, []).append(r)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))], dict(sorted(follow.items()))

    @torch.no_grad()
    def _run(self, jobs: list[tuple[list[int], int]], s: Sampling, on_done=None) -> list[Rollout]:
        """Rollouts of (prompt ids, seed) jobs; `on_done(list of (job, rollout))` may return more jobs."""
        jobs = list(jobs)
        out: dict[int, Rollout] = {}
        order: list[int] = []  # the job of each of decode's requests, in decode's order

        def too_long(job: int) -> bool:
            p = jobs[job][0]
            if len(p) < self.max_total_length:
                return False
            log.warning("a prompt of %d tokens leaves no room under model.max_total_sequence_length=%d; "
                        "its rollout is empty", len(p), self.max_total_length)
            out[job] = Rollout(list(p), [], [], "", False)
            return True

        def request(job: int) -> Request:
            p, seed = jobs[job]
            order.append(job)
            return Request(p, min(s.max_new_tokens, self.max_total_length - len(p)), seed)

        def settle(rolls: list[tuple[int, Rollout]]) -> list[Request]:
            """Tell `on_done`; its new jobs become requests (an over-long one is done at once: tell again)."""
            new = []
            while rolls and on_done is not None:
                added, rolls = on_done(rolls) or [], []
                for p, seed in added:
                    jobs.append((list(p), seed))
                    if too_long(len(jobs) - 1):
                        rolls.append((len(jobs) - 1, out[len(jobs) - 1]))
                    else:
                        new.append(request(len(jobs) - 1))
            return new

        def finished(done: list[tuple[int, Decoded]]) -> list[Request]:
            rolls = []
            for k, d in done:
                job = order[k]
                out[job] = Rollout(list(jobs[job][0]), d.response_ids, d.logprobs,
                                   self.tok.decode(d.response_ids, skip_special_tokens=True), d.finished)
                rolls.append((job, out[job]))
            return settle(rolls)

        short = [j for j in range(len(jobs)) if not too_long(j)]
        short.sort(key=lambda j: -len(jobs[j][0]))  # length buckets; stable, so a group's samples stay together
        requests = [request(j) for j in short]
        requests += settle([(j, out[j]) for j in range(len(jobs)) if j in out])
        with eval_mode(self.model):
            decode(self.model, requests, s.temperature, s.top_p, s.greedy, self.batch_size, self.eos_ids,
                   self.pad_id, finished)
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


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def make_generator(backend: str, model, tokenizer, batch_size: int, max_total_length: int,
                   gpu_memory_utilization: float = 0.5, dtype: Optional[str] = None) -> Generator:
    if backend == "transformers":
        return TransformersGenerator(model, tokenizer, batch_size, max_total_length, dtype)
    if backend == "vllm":
        from hdpo.generation_vllm import VLLMGenerator, configure_vllm_env

        configure_vllm_env()  # before vLLM is imported: the colocated engine runs in this process
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise RuntimeError("generation.backend=vllm needs vLLM and a CUDA GPU (pip install 'hdpo[gpu]'); "
                               "on CPU set generation.backend=transformers (config/demo.yaml does)") from None
        if not torch.cuda.is_available():
            raise RuntimeError("generation.backend=vllm needs a CUDA GPU, and torch sees none; on CPU set "
                               "generation.backend=transformers (config/demo.yaml does)")
        return VLLMGenerator(model, tokenizer, max_total_length, gpu_memory_utilization, dtype=dtype)
    raise ValueError(f"generation.backend: unknown backend {backend!r}")
