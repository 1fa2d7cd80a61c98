"""Sampling rollouts: one interface, backends behind it.

The trainer only sees `Generator.generate(prompts, n, sampling) -> rollouts per prompt` and
`Generator.update_weights(model)` after each optimizer step. The transformers backend samples from the live
policy module itself (so its weights are always current); a vLLM backend keeps its own copy of the weights
and must reload them in `update_weights`.
"""
from __future__ import annotations

import logging
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
    """Batched `model.generate` with left padding, stopping at EOS."""

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int, max_total_length: int):
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_total_length = batch_size, max_total_length
        self.eos_ids = _eos_ids(model, tokenizer)

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, sampling: Sampling) -> list[list[Rollout]]:
        flat = [p for p in prompts for _ in range(n)]  # n samples of a prompt sit together
        out: list[Rollout] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(flat), self.batch_size):
                out.extend(self._generate_batch(flat[start:start + self.batch_size], sampling))
        finally:
            self.model.train(was_training)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[str], s: Sampling) -> list[Rollout]:
        device = next(self.model.parameters()).device
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        width = enc.input_ids.shape[1]
        max_new = min(s.max_new_tokens, self.max_total_length - width)
        if max_new < 1:  # a run must not die on one over-long (e.g. privileged) prompt: answer it briefly
            log.warning("a prompt of %d tokens leaves no room under model.max_total_sequence_length=%d; "
                        "generating 1 token for its batch", width, self.max_total_length)
            max_new = 1
        gen_cfg = HFGenerationConfig(  # explicit: never inherit a model's own sampling defaults
            do_sample=not s.greedy, temperature=None if s.greedy else s.temperature,
            top_p=None if s.greedy else s.top_p, top_k=0 if not s.greedy else None, max_new_tokens=max_new,
            eos_token_id=self.eos_ids, pad_token_id=self.tok.pad_token_id)
        recorder = _SampledLogprobs()
        seqs = self.model.generate(**enc, generation_config=gen_cfg,
                                   logits_processor=LogitsProcessorList([recorder]))
        logprobs = recorder.finish(seqs).cpu()
        responses = seqs[:, width:].cpu()
        rollouts = []
        for i in range(len(prompts)):
            prompt_ids = enc.input_ids[i][enc.attention_mask[i].bool()].tolist()
            ids = responses[i].tolist()
            end = next((j for j, t in enumerate(ids) if t in self.eos_ids), None)
            finished = end is not None
            ids = ids[:end + 1] if finished else ids
            rollouts.append(Rollout(prompt_ids, ids, logprobs[i, :len(ids)].tolist(),
                                    self.tok.decode(ids, skip_special_tokens=True), finished))
        return rollouts


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def make_generator(backend: str, model, tokenizer, batch_size: int, max_total_length: int,
                   gpu_memory_utilization: float = 0.5, dtype: Optional[str] = None) -> Generator:
    if backend == "transformers":
        return TransformersGenerator(model, tokenizer, batch_size, max_total_length)
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
