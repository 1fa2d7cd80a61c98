"""What the samplers draw from, and with which seeds (issue 9):

- the transformers backend samples exactly softmax(logits / T) (top-p cut), whatever the checkpoint's
  generation_config.json says, and its recorded log-probs equal the trainer's at float32 round-off, also at T != 1;
- the vLLM backend leaves nothing to SamplingParams defaults or the checkpoint's generation config;
- samples are a function of (seed, sample index): not of the batch size, the batch's other rows or their order;
- evaluation samples are a function of (seed, benchmark, problem): two evaluations of a checkpoint, or of two
  identical checkpoints, give identical rows, also through the real `hdpo evaluate` command.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_config, tiny_problems
from hdpo.config import SYSTEM_PROMPT, ConfigError
from hdpo.data import build_messages, render_prompt
from hdpo.decode import draw, seed_keys, uniforms
from hdpo.generation import Sampling, TransformersGenerator, problem_seed, sample_seeds, stream_seed
from hdpo.generation_vllm import build_engine_kwargs, sampling_kwargs
from hdpo.update import GrpoItem, MicroBatching, Objective, accumulate_gradients, teacher_topk

# A checkpoint whose generation config would change every step of sampling if it were inherited.
DIRTY_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "repetition_penalty": 1.3,
                           "no_repeat_ngram_size": 2, "min_new_tokens": 6, "typical_p": 0.5, "suppress_tokens": [28]}


@pytest.fixture(scope="module")
def random_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """An untrained 2-layer Llama with the real tokenizer: near-uniform next tokens, so samples differ a lot
    between seeds (a test of seeding can fail)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper random distribution: some tokens likely, EOS sometimes
        model.lm_head.weight.mul_(40.0)
    out = tmp_path_factory.mktemp("random_model")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load(model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tok


@pytest.fixture(scope="module")
def dirty_model_dir(random_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dirty_model")
    shutil.copytree(random_model_dir, out, dirs_exist_ok=True)
    cfg = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**cfg, **DIRTY_GENERATION_CONFIG}))
    return out


def prompts(tok, count: int = 3) -> list[str]:
    """Chat prompts of different lengths (left padding differs with the batch)."""
    probs = tiny_problems()[:count]
    return [render_prompt(tok, build_messages(p, SYSTEM_PROMPT + " Be brief." * i)) for i, p in enumerate(probs)]


def trainer_mismatch(model, rollouts, temperature: float) -> float:
    """Mean |sampler log-prob - trainer log-prob| over the rollouts' tokens, measured by the trainer's own
    `accumulate_gradients` (its forward, its temperature) on the sampled tokens."""
    items = [GrpoItem(r.prompt_ids, r.response_ids, 1.0, r.logprobs) for r in rollouts]
    parts = accumulate_gradients(model, items, [], (1.0, 1.0), Objective(0.0, temperature=temperature),
                                 MicroBatching(4))
    model.zero_grad(set_to_none=True)
    return parts.mismatch_sum / parts.mismatch_tokens


def ids_of(groups) -> list[list[list[int]]]:
    return [[r.response_ids for r in g] for g in groups]


# --- the sampler's distribution, brute force ------------------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampler_draws_softmax_over_temperature_within_top_p(temperature, top_p):
    """20000 rows with their own seeds, one step each: frequencies match the exact distribution."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20000
    chosen, lp = draw(logits.expand(rows, -1).clone(), seed_keys(torch.arange(rows)), torch.zeros(rows, dtype=torch.long),
                      temperature, top_p, greedy=False)
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[before < top_p]] = True
    want = torch.where(keep, p, torch.zeros_like(p))
    want = want / want.sum()
    freq = torch.bincount(chosen, minlength=len(logits)).double() / rows
    sigma = (want * (1 - want) / rows).sqrt()
    assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (freq, want)
    # recorded log-prob: log_softmax(logits / T) of the chosen token (before the top-p cut)
    torch.testing.assert_close(lp.double(), torch.log(p)[chosen], atol=1e-6, rtol=0)


def test_two_level_draw_is_exact_over_many_blocks_and_skips_masked_tokens():
    """V = 50 (7 blocks of 8, the last one padded), random logits with masked tokens and a whole masked block:
    40000 draws match softmax within 5 sigma for every token, and no masked token is ever drawn."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=g) * 2
    logits[[0, 13, 49]] = -math.inf
    logits[16:24] = -math.inf  # block 2 entirely
    rows = 40000
    chosen, _ = draw(logits.expand(rows, -1).clone(), seed_keys(torch.arange(rows) * 7 + 1), torch.full((rows,), 5),
                     1.0, 1.0, greedy=False)
    p = torch.softmax(logits.double(), -1)
    freq = torch.bincount(chosen, minlength=50).double() / rows
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / rows).sqrt() + 1e-12), (freq, p)
    assert int(freq[p == 0].sum()) == 0
    greedy, lp = draw(logits[None], seed_keys(torch.tensor([1])), torch.tensor([0]), 1.0, 1.0, greedy=True)
    assert int(greedy) == int(logits.argmax()) and math.isclose(float(lp), math.log(float(p.max())), rel_tol=1e-5)


def test_uniforms_are_a_function_of_seed_step_and_index():
    seeds, steps = seed_keys(torch.tensor([5, 6, 5, 5])), torch.tensor([0, 0, 1, 0])
    u = uniforms(seeds, steps, 1000)
    assert torch.equal(u[0], u[3]) and torch.equal(uniforms(seeds[1:2], steps[1:2], 1000)[0], u[1])  # no company
    assert torch.equal(uniforms(seeds[:1], steps[:1], 10)[0], u[0, :10])  # a prefix of a longer draw
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    big = uniforms(seed_keys(torch.arange(200)), torch.arange(200) % 7, 500).flatten()
    assert bool(((big > 0) & (big < 1)).all())
    # uniform: the empirical CDF within the Kolmogorov-Smirnov 0.1% bound of the uniform's
    srt = big.sort().values
    grid = torch.arange(1, len(srt) + 1, dtype=torch.float64) / len(srt)
    assert float((srt - grid).abs().max()) < 1.95 / math.sqrt(len(srt))
    # neighbouring counters are not correlated
    a, b = uniforms(seed_keys(torch.arange(100000)), torch.zeros(100000, dtype=torch.long), 2).T
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.02


def test_seeds_are_stable_and_distinct():
    assert stream_seed(42, "math500", "test/1") == stream_seed(42, "math500", "test/1")  # no salted hash()
    assert len({problem_seed(42, b, i) for b in ("math500", "aime24") for i in ("1", "2")}) == 4
    assert problem_seed(42, "math500", "1") != problem_seed(43, "math500", "1")
    assert sample_seeds([7, 8], 2, 3)[3:] == sample_seeds([8], 1, 3)  # a prompt's seeds do not depend on others
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        sample_seeds([1, 2], 3, 1)


# --- the transformers backend on a real tiny model -----------------------------------------------------------

@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_equal_the_trainers_at_temperature(random_model_dir, temperature, top_p):
    """End to end: the generator's recorded log-probs against the trainer's (accumulate_gradients at the same
    temperature) on the sampled tokens: float32 round-off, at T = 1 and T = 0.7."""
    model, tok = load(random_model_dir)
    gen = TransformersGenerator(model, tok, batch_size=4, max_total_length=512)
    groups = gen.generate(prompts(tok), 3, Sampling(temperature, top_p, max_new_tokens=10), seeds=[1, 2, 3])
    flat = [r for g in groups for r in g]
    assert sum(len(r.response_ids) for r in flat) > 20
    assert trainer_mismatch(model, flat, temperature) < 1e-5
    if temperature != 1.0:  # and the trainer at T = 1 (the old behaviour) would be far off: the test can fail
        assert trainer_mismatch(model, flat, 1.0) > 1e-2


def test_teacher_topk_is_at_the_temperature(random_model_dir):
    from hdpo.logprobs import response_logits

    model, tok = load(random_model_dir)
    p = [tok(prompts(tok, 1)[0], add_special_tokens=False).input_ids]
    r = [[5, 6, 7, 8]]
    (vals, ids), = teacher_topk(model, p, r, 4, MicroBatching(2, pad_id=tok.pad_token_id), temperature=0.7)
    logits, _, _ = response_logits(model, p, r, tok.pad_token_id)
    ref_vals, ref_ids = (logits[0].float() / 0.7).topk(4, dim=-1)
    assert torch.equal(ids, ref_ids) and torch.allclose(vals, ref_vals)


def test_checkpoint_generation_config_is_not_inherited(random_model_dir, dirty_model_dir):
    """A checkpoint with repetition_penalty 1.3, top_k 3, no_repeat_ngram_size 2, ... samples exactly as the same
    weights without them, and its log-probs are the trainer's."""
    clean, tok = load(random_model_dir)
    dirty, _ = load(dirty_model_dir)
    assert dirty.generation_config.repetition_penalty == 1.3  # the settings are really there
    s = Sampling(0.7, 1.0, max_new_tokens=12)
    a = TransformersGenerator(clean, tok, 8, 512).generate(prompts(tok), 4, s, seeds=[1, 2, 3])
    b = TransformersGenerator(dirty, tok, 8, 512).generate(prompts(tok), 4, s, seeds=[1, 2, 3])
    assert ids_of(a) == ids_of(b)
    flat = [r for g in b for r in g]
    assert trainer_mismatch(dirty, flat, 0.7) < 1e-5
    assert dirty.generation_config.repetition_penalty == 1.3  # put back after generating
    # greedy too: the checkpoint's min_new_tokens / suppress_tokens would change the argmax path
    g = Sampling(max_new_tokens=12, greedy=True)
    assert ids_of(TransformersGenerator(clean, tok, 8, 512).generate(prompts(tok), 1, g)) == \
        ids_of(TransformersGenerator(dirty, tok, 8, 512).generate(prompts(tok), 1, g))


def test_samples_do_not_depend_on_batch_size_or_company(random_model_dir):
    model, tok = load(random_model_dir)
    ps, s = prompts(tok), Sampling(1.0, 1.0, max_new_tokens=10)
    ref = TransformersGenerator(model, tok, 16, 512).generate(ps, 3, s, seeds=[11, 12, 13])
    for bs in (1, 5):
        assert ids_of(TransformersGenerator(model, tok, bs, 512).generate(ps, 3, s, seeds=[11, 12, 13])) == ids_of(ref)
    # reversed order, and one prompt alone: each prompt keeps its samples
    rev = TransformersGenerator(model, tok, 4, 512).generate(ps[::-1], 3, s, seeds=[13, 12, 11])
    assert ids_of(rev)[::-1] == ids_of(ref)
    alone = TransformersGenerator(model, tok, 4, 512).generate(ps[1:2], 3, s, seeds=[12])
    assert ids_of(alone) == ids_of(ref)[1:2]
    # the seeds matter (so the equalities above are not vacuous)
    other = TransformersGenerator(model, tok, 16, 512).generate(ps, 3, s, seeds=[21, 22, 23])
    assert ids_of(other) != ids_of(ref)
    assert len({tuple(r.response_ids) for g in ref for r in g}) > 3


def test_a_row_limit_is_its_own_prompts_room(random_model_dir):
    """Near model.max_total_sequence_length a row's room is set by its own prompt, not the padded batch."""
    model, tok = load(random_model_dir)
    ps = prompts(tok)
    lengths = [len(tok(p, add_special_tokens=False).input_ids) for p in ps]
    total = max(lengths) + 4
    s = Sampling(1.0, 1.0, max_new_tokens=50)
    together = TransformersGenerator(model, tok, 8, total).generate(ps, 2, s, seeds=[1, 2, 3])
    for i, p in enumerate(ps):
        alone = TransformersGenerator(model, tok, 8, total).generate([p], 2, s, seeds=[i + 1])[0]
        assert ids_of([alone]) == ids_of(together)[i:i + 1]
        assert all(len(r.response_ids) <= total - lengths[i] for r in alone)


# --- the vLLM backend's parameters (by construction; no vLLM here) -------------------------------------------

def test_vllm_params_leave_nothing_to_defaults():
    kw = sampling_kwargs(Sampling(0.7, 0.95, max_new_tokens=9), 9, [2], seed=5)
    assert kw["temperature"] == 0.7 and kw["top_p"] == 0.95 and kw["seed"] == 5
    assert kw["top_k"] == 0 and kw["min_p"] == 0.0 and kw["repetition_penalty"] == 1.0
    assert kw["presence_penalty"] == 0.0 and kw["frequency_penalty"] == 0.0 and kw["min_tokens"] == 0
    engine = build_engine_kwargs("m", "bfloat16", 512, 0.5, {"generation_config", "logprobs_mode"}, False)
    assert engine["generation_config"] == "vllm" and engine["logprobs_mode"] == "processed_logprobs"


def test_zero_training_temperature_is_refused(random_model_dir):
    with pytest.raises(ConfigError, match="generation.temperature"):
        tiny_config(random_model_dir, **{"generation.temperature": 0.0})


# --- seeded evaluation ---------------------------------------------------------------------------------------

def _rows(path: Path) -> list[dict]:
    from hdpo.io import read_jsonl

    return read_jsonl(path.with_name(path.stem + ".samples.jsonl.gz"))


def test_evaluation_is_a_function_of_seed_benchmark_problem(random_model_dir, tiny_data, tmp_path):
    from hdpo.evaluate import evaluate_checkpoint

    out = {}
    for name, overrides in (("a", {}), ("b", {}), ("bs1", {"generation.batch_size": 1}),
                            ("seed", {"seed": 2})):
        cfg = tiny_config(random_model_dir, **overrides)
        out[name] = evaluate_checkpoint(cfg, random_model_dir, "toy", tiny_data, tmp_path / name / "toy.json")
    rows = {k: _rows(tmp_path / k / "toy.json") for k in out}
    for k in ("b", "bs1"):
        for ra, rb in zip(rows["a"], rows[k]):
            assert ra == rb, (k, ra, rb)
    assert rows["seed"] != rows["a"]  # another seed draws other samples
    assert len({s["text"] for r in rows["a"] for s in r["samples"]}) > 1


def test_an_evaluation_agrees_with_its_own_samples(tiny_model_dir, tiny_data, tmp_path):
    """Every number of a result recomputed from its samples file: each sample's reward by math-verify against
    the problem's answer, each problem's correct count, pass@k by the closed form 1 - C(n-c, k) / C(n, k),
    and greedy accuracy. The tiny model answers 7, so the toy set's 7s and 8s give both outcomes."""
    from math import comb

    from hdpo.evaluate import evaluate_checkpoint
    from hdpo.reward import score_one

    cfg = tiny_config(tiny_model_dir, **{"eval.num_samples": 4, "eval.pass_k": [1, 2, 4]})
    result = evaluate_checkpoint(cfg, tiny_model_dir, "toy", tiny_data, tmp_path / "toy.json")
    rows = _rows(tmp_path / "toy.json")
    assert result["num_problems"] == len(rows) == 3 and result["num_samples"] == 4
    counts = []
    for row in rows:
        rewards = [s["reward"] for s in row["samples"]]
        assert rewards == [score_one(s["text"], row["answer"])[0] for s in row["samples"]]
        assert row["num_correct"] == sum(r == 1.0 for r in rewards)
        assert row["greedy"]["reward"] == score_one(row["greedy"]["text"], row["answer"])[0]
        counts.append(row["num_correct"])
    assert 0 < sum(counts) < 4 * len(rows)  # some right, some wrong: the numbers below are not trivial
    for k in (1, 2, 4):
        want = sum(1 - comb(4 - c, k) / comb(4, k) for c in counts) / len(counts)
        assert result[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    assert result["greedy_acc"] == pytest.approx(sum(r["greedy"]["reward"] for r in rows) / len(rows))


def test_identical_checkpoints_give_identical_rows_through_the_cli(random_model_dir, tiny_data, tmp_path):
    """`hdpo evaluate` (a subprocess, as Snakemake runs it) on two copies of one checkpoint labelled as two
    methods, one at another generation.batch_size: the same numbers and the same samples."""
    cfg = tiny_config(random_model_dir)
    from hdpo.config import save_config

    save_config(cfg, tmp_path / "config.yaml")
    results = []
    for method, batch in (("grpo", 16), ("hdpo_frozen_lambda0.1", 3)):
        model = tmp_path / method / "policy_best"
        shutil.copytree(random_model_dir, model)
        (model / "hdpo_meta.json").write_text(json.dumps({"run": f"{method}_seed1", "method": method, "seed": 1,
                                                          "checkpoint": "best", "model_step": 0}))
        out = tmp_path / "eval" / method / "toy.json"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run([sys.executable, "-m", "hdpo", "evaluate", "--config", str(tmp_path / "config.yaml"),
                               "--set", f"generation.batch_size={batch}", "--model", str(model), "--benchmark", "toy",
                               "--data", str(tiny_data), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append((json.loads(out.read_text()), _rows(out)))
    (a, rows_a), (b, rows_b) = results
    assert rows_a == rows_b
    numbers = [k for k in a if k.startswith(("pass@", "greedy"))]
    assert numbers and all(a[k] == b[k] for k in numbers)
    assert a["method"] != b["method"]



def test_a_best_policy_equal_to_the_final_copies_its_result_and_no_other_does(random_model_dir, tiny_data, tmp_path):
    """`hdpo evaluate --reuse`: a best policy with the final policy's files gets the final's numbers and samples
    (what drawing them again gives: seeded evaluation), labelled as itself; other weights, another seed or
    another benchmark file draw their own."""
    from transformers import LlamaForCausalLM

    from hdpo.evaluate import evaluate_checkpoint

    def policy(name: str, checkpoint: str, nudge: float = 0.0) -> Path:
        folder = tmp_path / name
        shutil.copytree(random_model_dir, folder)
        if nudge:
            model = LlamaForCausalLM.from_pretrained(folder)
            with torch.no_grad():
                model.model.norm.weight[0] += nudge
            model.save_pretrained(folder)
        (folder / "hdpo_meta.json").write_text(json.dumps({"run": "r_seed1", "method": "r", "seed": 1,
                                                           "checkpoint": checkpoint, "model_step": 2}))
        (folder / ".snakemake_timestamp").write_text(checkpoint)  # what Snakemake puts in a directory output
        return folder

    cfg = tiny_config(random_model_dir)
    final_json = tmp_path / "eval" / "final" / "toy.json"
    final = evaluate_checkpoint(cfg, policy("final", "final"), "toy", tiny_data, final_json)
    best = policy("best", "best")
    drawn = evaluate_checkpoint(cfg, best, "toy", tiny_data, tmp_path / "eval" / "drawn" / "toy.json")
    copied = evaluate_checkpoint(cfg, best, "toy", tiny_data, tmp_path / "eval" / "best" / "toy.json",
                                 reuse=[tmp_path / "missing.json", final_json])
    assert copied["reused_from"] == str(final_json) and copied["checkpoint"] == "best" == drawn["checkpoint"]
    assert {k: v for k, v in copied.items() if k not in ("reused_from", "seconds")} == \
        {k: v for k, v in drawn.items() if k != "seconds"}
    assert json.loads((tmp_path / "eval" / "best" / "toy.json").read_text()) == copied
    assert _rows(tmp_path / "eval" / "best" / "toy.json") == _rows(tmp_path / "eval" / "drawn" / "toy.json")
    assert final["model_digest"] == drawn["model_digest"]
    # the untrained model's row (its folder has no label and no timestamp) is a candidate too
    base_json = tmp_path / "eval" / "base" / "toy.json"
    evaluate_checkpoint(cfg, random_model_dir, "toy", tiny_data, base_json, meta={"run": "base", "checkpoint": "base"})
    from_base = evaluate_checkpoint(cfg, best, "toy", tiny_data, tmp_path / "eval" / "best0" / "toy.json",
                                    reuse=[base_json])
    assert from_base["reused_from"] == str(base_json) and from_base["checkpoint"] == "best"
    assert from_base["run"] == "r_seed1" and from_base["pass@1"] == drawn["pass@1"]

    nudged = evaluate_checkpoint(cfg, policy("nudged", "best", nudge=0.5), "toy", tiny_data,
                                 tmp_path / "eval" / "nudged" / "toy.json", reuse=[final_json])
    other_seed = evaluate_checkpoint(tiny_config(random_model_dir, seed=2), best, "toy", tiny_data,
                                     tmp_path / "eval" / "seed2" / "toy.json", reuse=[final_json])
    bench = tiny_data / "benchmarks" / "toy.jsonl"
    shutil.copyfile(bench, bench.with_name("toy2.jsonl"))  # the same file under another name seeds other samples
    renamed = evaluate_checkpoint(cfg, best, "toy2", tiny_data, tmp_path / "eval" / "toy2" / "toy2.json",
                                  reuse=[final_json])
    bench.write_text("\n".join(bench.read_text().splitlines()[:2]) + "\n")
    fewer = evaluate_checkpoint(cfg, best, "toy", tiny_data, tmp_path / "eval" / "fewer" / "toy.json",
                                reuse=[final_json])
    assert not any("reused_from" in r for r in (nudged, other_seed, renamed, fewer))
    assert nudged["model_digest"] != final["model_digest"] and fewer["num_problems"] == 2
