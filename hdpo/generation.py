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
So which tokens a sample gets does not depend on the batch it shares, the batch size, the job order or the
number of ranks, up to float round-off in batched forwards (a draw moves only when round-off swaps its two
best Gumbel-perturbed scores: rare), and given the device (CPU and CUDA random streams differ).
"""
from __future__ import annotations

import hashlib
import logging
from copy import deepcopy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList

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


def sample_seeds(seeds: Optional[list[int]], num_prompts: int, n: int) -> list[int]:
    """One seed per sample, prompt-major (sample j of prompt i at i * n + j)."""
    if seeds is None:  # from torch's RNG, which the trainer seeds per (seed, step, rank)
        seeds = torch.randint(0, 2**31 - 1, (num_prompts,)).tolist()
    if len(seeds) != num_prompts:
        raise ValueError(f"{len(seeds)} seeds for {num_prompts} prompts")
    return [stream_seed(s, j) for s in seeds for j in range(n)]


class _Sampler(LogitsProcessor):
    """Draws each row's next token itself, from the model's raw logits, and hands `generate` (greedy) a
    one-hot score so it takes exactly that token. Each row has its own torch.Generator (on the model's device),
    so its draws do not depend on the other rows. The draw is the Gumbel-max trick: argmax of
    log_softmax(logits / T) + Gumbel noise (a fresh noise vector per row and step), which samples
    softmax(logits / T) exactly and, unlike an inverse-CDF draw over a cumulative sum of the whole vocabulary,
    moves only if round-off changes the order of the two best perturbed scores. It records
    log_softmax(logits / T) of the chosen token, and ends a row with EOS once it reaches its own length limit
    (that EOS is cut off again: the row's room is its own prompt's, not the padded batch's)."""

    def __init__(self, s: Sampling, seeds: list[int], width: int, limits: list[int], eos_id: int,
                 device: torch.device = torch.device("cpu")):
        self.s, self.width, self.eos_id = s, width, eos_id
        self.limits = torch.tensor(limits, device=device)
        self.gens = None if s.greedy else [torch.Generator(device=device).manual_seed(x) for x in seeds]
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()
        t = input_ids.shape[1] - self.width  # tokens generated so far
        if self.s.greedy:
            logp = torch.log_softmax(logits, dim=-1)
            chosen = logp.argmax(-1)
        else:
            logp = torch.log_softmax(logits / self.s.temperature, dim=-1)
            perturbed = logp
            if self.s.top_p < 1.0:  # keep the most likely tokens whose mass before them is below top_p
                sp, order = logp.exp().sort(-1, descending=True)
                drop_sorted = (sp.cumsum(-1) - sp) >= self.s.top_p
                perturbed = logp.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
            # one stream per row (on CPU several times cheaper than a counter-based hash of (seed, step, token))
            u = torch.stack([torch.rand(logp.shape[-1], generator=g, device=g.device) for g in self.gens])
            gumbel = -torch.log(-torch.log(u.to(logp.device).clamp(1e-20, 1.0 - 1e-7)))
            chosen = (perturbed + gumbel).argmax(-1)
        self.steps.append(logp.gather(-1, chosen[:, None]).squeeze(-1))
        chosen = torch.where(self.limits <= t, torch.full_like(chosen, self.eos_id), chosen)  # no host sync
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen[:, None], 0.0)

    def logprobs(self, batch: int) -> torch.Tensor:
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(batch, 0)


class TransformersGenerator(Generator):
    """Batched `model.generate` with left padding, stopping at EOS; sampling by `_Sampler`.

    Speed on GPU: when the policy keeps float32 master weights and the config's dtype is bf16/fp16, sampling
    runs on a copy of the policy in that dtype (no autocast casts per decoding step; 2.5x the tokens/s of the
    float32 module under autocast at batch 256), refreshed by `update_weights` after every optimizer step.
    Prompts are sorted by length before they are cut into batches, so a long (privileged) prompt pads and
    limits only prompts of similar length; each sample keeps its own seed, so the order changes no draw. A
    prompt that leaves no room under `max_total_length` gets an empty, unfinished rollout and a warning (as
    the vLLM backend does), never the run killed.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int, max_total_length: int,
                 dtype: Optional[str] = None):
        self.tok = tokenizer
        self.batch_size, self.max_total_length = batch_size, max_total_length
        self.model = generation_copy(model, dtype)
        self.eos_ids = _eos_ids(model, tokenizer)

    def update_weights(self, model: torch.nn.Module) -> None:
        if self.model is model:
            return  # sampling from the live module: always current
        with torch.no_grad():
            mine = dict(self.model.named_parameters())
            for name, p in model.named_parameters():
                mine[name].copy_(p)  # cast into the copy's dtype in place

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        ids = self.tok(prompts, add_special_tokens=False).input_ids
        flat_seeds = sample_seeds(seeds, len(prompts), n)
        out = self.generate_ids([p for p in ids for _ in range(n)], sampling, flat_seeds)  # a prompt's n together
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], sampling: Sampling,
                     seeds: Optional[list[int]] = None) -> list[Rollout]:
        """One rollout per prompt (token ids), in the order given; `seeds`: one per rollout (None: from torch)."""
        seeds = sample_seeds(seeds, len(prompt_ids), 1) if seeds is None else seeds
        out: list[Optional[Rollout]] = [None] * len(prompt_ids)
        todo = []
        for i, p in enumerate(prompt_ids):
            if len(p) >= self.max_total_length:
                log.warning("a prompt of %d tokens leaves no room under model.max_total_sequence_length=%d; "
                            "its rollout is empty", len(p), self.max_total_length)
                out[i] = Rollout(list(p), [], [], "", False)
            else:
                todo.append(i)
        todo.sort(key=lambda i: -len(prompt_ids[i]))  # length buckets; stable, so a group's samples stay together
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), self.batch_size):
                batch = todo[start:start + self.batch_size]
                done = self._generate_batch([prompt_ids[i] for i in batch], [seeds[i] for i in batch], sampling)
                for i, r in zip(batch, done):
                    out[i] = r
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: list[list[int]], seeds: list[int], s: Sampling) -> list[Rollout]:
        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_ids[0]
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: generation appends on the right
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p):] = 1
        limits = [min(s.max_new_tokens, self.max_total_length - len(p)) for p in prompts]  # >= 1: see generate_ids
        # Nothing inherited: transformers fills every field `generate` is not given from the model's own
        # generation config (a checkpoint's repetition_penalty, top_k, no_repeat_ngram_size, ...), so the
        # model's config is swapped for a bare one while generating, and `_Sampler` is the only processor.
        bare = HFGenerationConfig(do_sample=False, max_new_tokens=max(limits), eos_token_id=self.eos_ids,
                                  pad_token_id=pad)
        sampler = _Sampler(s, seeds, width, limits, self.eos_ids[0], device)
        own = self.model.generation_config
        self.model.generation_config = HFGenerationConfig(eos_token_id=self.eos_ids, pad_token_id=pad)
        try:
            seqs = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                       generation_config=bare, logits_processor=LogitsProcessorList([sampler]))
        finally:
            self.model.generation_config = own
        logprobs = sampler.logprobs(len(prompts)).cpu()
        responses = seqs[:, width:].cpu()
        rollouts = []
        for i, p in enumerate(prompts):
            ids = responses[i, :limits[i]].tolist()
            end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            finished = end is not None
            ids = ids[:end + 1] if finished else ids
            rollouts.append(Rollout(list(p), ids, logprobs[i, :len(ids)].tolist(),
                                    self.tok.decode(ids, skip_special_tokens=True), finished))
        return rollouts


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
    from hdpo.models import disable_activation_checkpointing

    disable_activation_checkpointing(copy)  # a sampler never backwards (H100, batch 256: 7.2k -> 8.4k tokens/s)
    return copy.to(half).requires_grad_(False).eval()


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
