"""Sampling rollouts: one interface, backends behind it.

The trainer only sees `Generator.generate(prompts, n, sampling) -> rollouts per prompt` and
`Generator.update_weights(model)` after each optimizer step. The transformers backend samples from the live
policy module on CPU, and on GPU from a bf16 copy that `update_weights` refreshes; a vLLM backend keeps its own
copy of the weights and must reload them in `update_weights`.
"""
from __future__ import annotations

import logging
from copy import deepcopy
from dataclasses import dataclass
from typing import Optional

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
    logprobs: list[float]  # the sampling model's log-probs (no temperature) of response_ids
    text: str  # decoded response, special tokens skipped
    finished: bool  # stopped at EOS (else cut at max_new_tokens)


class Generator:
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[list[Rollout]]:
        raise NotImplementedError

    def update_weights(self, model: torch.nn.Module) -> None:
        """Called after every optimizer step with the updated policy."""


class _SampledLogprobs(LogitsProcessor):
    """Records log p(token) of each sampled token from the model's raw logits, holding one step's
    distribution at a time instead of every step's full-vocabulary scores."""

    def __init__(self):
        self.prev: Optional[torch.Tensor] = None
        self.steps: list[torch.Tensor] = []

    def _take(self, chosen: torch.Tensor) -> None:
        self.steps.append(self.prev.gather(-1, chosen[:, None]).squeeze(-1))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(sequences[:, -1])
        self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(sequences.shape[0], 0)


class TransformersGenerator(Generator):
    """Batched `model.generate` with left padding, stopping at EOS.

    Speed on GPU: when the policy keeps float32 master weights and the config's dtype is bf16/fp16, sampling
    runs on a copy of the policy in that dtype (no autocast casts per decoding step; 2.5x the tokens/s of the
    float32 module under autocast at batch 256), refreshed by `update_weights` after every optimizer step.
    Prompts are sorted by length before they are cut into batches, so a long (privileged) prompt pads and
    limits only prompts of similar length. A prompt that leaves no room under `max_total_length` gets an
    empty, unfinished rollout and a warning (as the vLLM backend does), never the run killed.
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
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[list[Rollout]]:
        ids = self.tok(prompts, add_special_tokens=False).input_ids
        out = self.generate_ids([p for p in ids for _ in range(n)], sampling)  # n samples of a prompt sit together
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], sampling: Sampling) -> list[Rollout]:
        """One rollout per prompt (token ids), in the order given."""
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
                for i, r in zip(batch, self._generate_batch([prompt_ids[i] for i in batch], sampling)):
                    out[i] = r
        finally:
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: list[list[int]], s: Sampling) -> list[Rollout]:
        device = next(self.model.parameters()).device
        width = max(map(len, prompts))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_ids[0]
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: generation appends on the right
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p):] = 1
        max_new = min(s.max_new_tokens, self.max_total_length - width)  # >= 1: over-long prompts are set aside
        gen_cfg = HFGenerationConfig(  # explicit: never inherit a model's own sampling defaults
            do_sample=not s.greedy, temperature=None if s.greedy else s.temperature,
            top_p=None if s.greedy else s.top_p, top_k=0 if not s.greedy else None, max_new_tokens=max_new,
            eos_token_id=self.eos_ids, pad_token_id=pad)
        recorder = _SampledLogprobs()
        seqs = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   generation_config=gen_cfg, logits_processor=LogitsProcessorList([recorder]))
        logprobs = recorder.finish(seqs).cpu()
        responses = seqs[:, width:].cpu()
        rollouts = []
        for i, p in enumerate(prompts):
            ids = responses[i].tolist()
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
