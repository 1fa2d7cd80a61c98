"""The trainer on a tiny real transformers model: gradients invariant to how a batch is split, the HDPO
signal on cliffs, lambda = 0 being exactly GRPO, the frozen teacher kept apart, and exact resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_config, tiny_problems
from hdpo import distributed as hdist
from hdpo.config import SYSTEM_PROMPT
from hdpo.data import build_messages, render_prompt
from hdpo.logprobs import response_logits
from hdpo.train import Trainer, batch_indices, select_cliffs, warmup_factor
from hdpo.update import (DistillItem, GrpoItem, MicroBatching, Objective, UpdateParts, accumulate_gradients,
                         teacher_topk)


# --- pure pieces --------------------------------------------------------------------------------------

def test_warmup_is_linear_from_start_factor_then_constant():
    assert warmup_factor(0, 50, 0.1) == pytest.approx(0.1)
    assert warmup_factor(25, 50, 0.1) == pytest.approx(0.55)
    assert warmup_factor(50, 50, 0.1) == 1.0 and warmup_factor(500, 50, 0.1) == 1.0
    assert warmup_factor(0, 0, 0.1) == 1.0


def test_batches_are_a_pure_function_of_the_step():
    a = [batch_indices(s, 4, 10, seed=3) for s in range(5)]
    assert a == [batch_indices(s, 4, 10, seed=3) for s in range(5)]
    assert sorted(a[0] + a[1] + [*a[2][:2]]) == list(range(10))  # the first epoch covers every problem once
    assert a != [batch_indices(s, 4, 10, seed=4) for s in range(5)]


def test_cliff_cap_is_filled_in_rank_order():
    r = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert select_cliffs(r, 0.0, cap=32, cliffs_before_me=0) == [0, 2, 3]
    assert select_cliffs(r, 0.0, cap=2, cliffs_before_me=0) == [0, 2]
    assert select_cliffs(r, 0.0, cap=2, cliffs_before_me=1) == [0]
    assert select_cliffs(r, 0.0, cap=2, cliffs_before_me=5) == []


# --- forward passes and gradients ---------------------------------------------------------------------

def _load(model_dir, dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype), AutoTokenizer.from_pretrained(model_dir)


# The invariance tests run in float64: in float32 the order of a sum (another split, another CPU's kernels) moves
# single gradient elements by up to 5% (seen on an AVX-512 EPYC), which says nothing about the invariance itself.
F64 = dict(rtol=1e-9, atol=1e-12)


def _items(tok, n=6):
    """(prompt ids, response ids, advantage) with prompts and responses of different lengths."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p = tok(f"prompt {'x ' * i}number {i}", add_special_tokens=False).input_ids
        r = torch.randint(10, 1000, (3 + (i * 5) % 7,), generator=g).tolist()
        out.append((p, r, [1.5, -0.5, 0.0, 2.0, -1.0, 0.7][i % 6]))
    return out


def _distill_items(model, tok, items, k=8):
    """Teacher = the same model on a longer (privileged-like) prompt over the same responses."""
    priv = [p + tok(" with a hint", add_special_tokens=False).input_ids for p, _, _ in items]
    tk = teacher_topk(model, priv, [r for _, r, _ in items], k, MicroBatching(2, pad_id=tok.pad_token_id))
    return [DistillItem(p, r, v, i) for (p, r, _), (v, i) in zip(items, tk)]


def _grpo(items, sampled=None):
    """(prompt, response, advantage) triples, with the sampler's log-probs if given, as the update takes them."""
    return [GrpoItem(p, r, a, None if sampled is None else sampled[i]) for i, (p, r, a) in enumerate(items)]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_response_logits_align_with_unpadded_forward(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    items = _items(tok)
    logits, mask, ids = response_logits(model, [p for p, _, _ in items], [r for _, r, _ in items], tok.pad_token_id)
    for i, (p, r, _) in enumerate(items):
        with torch.no_grad():
            ref = model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
        torch.testing.assert_close(logits[i, :len(r)].detach(), ref, rtol=1e-4, atol=1e-4)
        assert mask[i].sum() == len(r) and ids[i, :len(r)].tolist() == r


def _accumulate(model, grpo, distill, micro, n_grpo=None, n_distill=None):
    model.zero_grad(set_to_none=True)
    n_grpo = n_grpo or sum(len(r) for _, r, _ in grpo)
    n_distill = n_distill or sum(len(d.response_ids) for d in distill)
    parts = accumulate_gradients(model, _grpo(grpo), distill, (n_grpo, n_distill), Objective(0.5), MicroBatching(micro))
    return parts, _grads(model)


def test_gradients_invariant_to_micro_batches(tiny_model_dir):
    model, tok = _load(tiny_model_dir, torch.float64)
    items = _items(tok)
    distill = _distill_items(model, tok, items)
    ref_parts, ref = _accumulate(model, items, distill, micro=len(items))
    assert ref_parts.jsd > 0 and math.isfinite(ref_parts.grpo)
    for micro in (1, 4):
        parts, grads = _accumulate(model, items, distill, micro=micro)
        assert parts.grpo == pytest.approx(ref_parts.grpo, rel=1e-9, abs=1e-12)
        assert parts.jsd == pytest.approx(ref_parts.jsd, rel=1e-9)
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], **F64)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_sampler_correction_weights_the_grpo_term_in_any_micro_batching(tiny_model_dir, mode):
    """accumulate_gradients with grpo.sampler_correction: float64, against the unsplit batch's loss with the
    truncated weights computed by hand, for one sequence per micro-batch and all in one."""
    from hdpo.losses import grpo_token_loss_sum, token_logprobs

    model, tok = _load(tiny_model_dir)
    model = model.double()
    items = _items(tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the sampler's log-probs: the trainer's, off by up to ~0.5 nats per token
        logits, mask, ids = response_logits(model, [p for p, _, _ in items], [r for _, r, _ in items], 0)
        lp = token_logprobs(logits, ids[..., None]).squeeze(-1)
    sampled = [(lp[i, :len(r)] + 0.3 * torch.randn(len(r), generator=g, dtype=torch.float64)).tolist()
               for i, (_, r, _) in enumerate(items)]
    n = float(sum(len(r) for _, r, _ in items))
    cap = 1.3
    model.zero_grad(set_to_none=True)
    logits, mask, ids = response_logits(model, [p for p, _, _ in items], [r for _, r, _ in items], 0)
    lp = token_logprobs(logits, ids[..., None]).squeeze(-1)
    w = torch.zeros_like(lp)
    for i, (_, r, _) in enumerate(items):
        ratio = (lp[i, :len(r)].detach() - torch.tensor(sampled[i], dtype=torch.float64)).exp()
        w[i, :len(r)] = ratio.clamp(max=cap) if mode == "token" else ratio.prod().clamp(max=cap)
    adv = torch.tensor([a for _, _, a in items], dtype=torch.float64)
    (grpo_token_loss_sum(lp, lp.detach(), adv, mask, 0.2, 0.2, weights=w) / n).backward()
    ref = _grads(model)
    assert 0 < (w[mask > 0] >= cap).sum() < mask.sum()  # some weights capped, some not
    for micro in (1, len(items)):
        model.zero_grad(set_to_none=True)
        parts = accumulate_gradients(model, _grpo(items, sampled), [], (n, 1.0),
                                     Objective(0.0, correction=mode, correction_cap=cap), MicroBatching(micro))
        assert parts.is_units == (n if mode == "token" else len(items))
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, ref[name], **F64)


def _accumulate_full_logits(model, grpo, distill, weight=0.5, temperature=1.0):
    """Today's math on the unsplit padded batch: full [B, T, V] logits, token_logprobs and topk_jsd."""
    from hdpo.losses import grpo_token_loss_sum, token_logprobs, topk_jsd

    model.zero_grad(set_to_none=True)
    n_grpo, n_distill = sum(len(r) for _, r, _ in grpo), sum(len(d.response_ids) for d in distill)
    logits, mask, ids = response_logits(model, [p for p, _, _ in grpo], [r for _, r, _ in grpo], 0)
    lp = token_logprobs(logits / temperature, ids[..., None]).squeeze(-1)
    adv = torch.tensor([a for _, _, a in grpo], dtype=lp.dtype)
    loss = grpo_token_loss_sum(lp, lp.detach(), adv, mask, 0.2, 0.2) / n_grpo
    logits, mask, _ = response_logits(model, [d.prompt_ids for d in distill], [d.response_ids for d in distill], 0)
    T, k = logits.shape[1], distill[0].topk_ids.shape[-1]
    t_vals = torch.zeros(len(distill), T, k, dtype=distill[0].topk_logits.dtype)
    t_ids = torch.zeros(len(distill), T, k, dtype=torch.long)
    for j, d in enumerate(distill):
        t_vals[j, :len(d.response_ids)], t_ids[j, :len(d.response_ids)] = d.topk_logits, d.topk_ids
    jsd = (topk_jsd(t_vals, token_logprobs(logits / temperature, t_ids)) * mask).sum() / n_distill
    (loss + weight * jsd).backward()
    return UpdateParts(grpo=loss.item(), jsd=jsd.item()), _grads(model)


@pytest.mark.parametrize("budget,pack", [(None, False), (40, False), (40, True), (1, True), (10**6, True)])
def test_token_budget_and_packing_equal_the_unsplit_full_logits_batch(tiny_model_dir, budget, pack):
    model, tok = _load(tiny_model_dir, torch.float64)
    items = _items(tok)
    distill = _distill_items(model, tok, items)
    ref_parts, ref = _accumulate_full_logits(model, items, distill)
    model.zero_grad(set_to_none=True)
    n_grpo, n_distill = sum(len(r) for _, r, _ in items), sum(len(d.response_ids) for d in distill)
    parts = accumulate_gradients(model, _grpo(items), distill, (n_grpo, n_distill), Objective(0.5),
                                 MicroBatching(len(items), budget, pack, chunk=5))
    assert parts.grpo == pytest.approx(ref_parts.grpo, rel=1e-9, abs=1e-12)
    assert parts.jsd == pytest.approx(ref_parts.jsd, rel=1e-9)
    grads = _grads(model)
    assert set(grads) == set(ref)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], **F64)


def test_teacher_topk_equals_full_logits_topk_with_temperature(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    items = _items(tok)
    prompts, responses = [p for p, _, _ in items], [r for _, r, _ in items]
    with torch.no_grad():
        logits, _, _ = response_logits(model, prompts, responses, 0)
    for pack in (False, True):
        got = teacher_topk(model, prompts, responses, 8, MicroBatching(4, 30, pack), temperature=0.5)
        for j, (vals, ids) in enumerate(got):
            ref_vals, ref_ids = (logits[j, :len(responses[j])] / 0.5).topk(8, -1)
            torch.testing.assert_close(vals, ref_vals, rtol=1e-4, atol=1e-4)
            assert (ids == ref_ids).float().mean() > 0.99  # ties aside, the same tokens


def _rank_worker(rank, world, model_dir, rdv, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, tok = _load(model_dir, torch.float64)
    items = _items(tok)
    distill = _distill_items(model, tok, items)
    half = len(items) // world
    mine, mine_d = items[rank * half:(rank + 1) * half], distill[rank * half:(rank + 1) * half]
    # the token counts are global: summed over ranks, as the trainer does
    n_grpo, n_distill = hdist.sum_all([sum(len(r) for _, r, _ in mine), sum(len(d.response_ids) for d in mine_d)])
    parts, _ = _accumulate(model, mine, mine_d, micro=2, n_grpo=n_grpo, n_distill=n_distill)
    hdist.sum_gradients(list(model.parameters()))
    total = hdist.sum_all([parts.grpo, parts.jsd])
    if rank == 0:
        torch.save({"grads": _grads(model), "parts": total}, out)
    torch.distributed.destroy_process_group()


def test_gradients_same_on_one_and_two_ranks(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir, torch.float64)
    items = _items(tok)
    ref_parts, ref = _accumulate(model, items, _distill_items(model, tok, items), micro=3)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_worker, args=(2, str(tiny_model_dir), str(tmp_path / "rdv"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["parts"][0] == pytest.approx(ref_parts.grpo, rel=1e-9, abs=1e-12)
    assert got["parts"][1] == pytest.approx(ref_parts.jsd, rel=1e-9)
    for name in ref:
        torch.testing.assert_close(got["grads"][name], ref[name], **F64)


# --- the trainer end to end ---------------------------------------------------------------------------

def _data(tmp_path, answers):
    from hdpo.io import write_jsonl

    d = tmp_path / "data"
    probs = [p for p in tiny_problems() if p.answer in answers]
    write_jsonl(d / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(d / "val.jsonl", [p.to_dict() for p in probs[:2]])
    return d


def _run(tmp_path, model_dir, name, data, resume=False, **overrides):
    cfg = tiny_config(model_dir, **overrides)
    trainer = Trainer(cfg, data, tmp_path / "runs" / name, tmp_path / "work" / name, tmp_path / "models")
    trainer.fit(resume=resume)
    return trainer


def _prob_of_answer(model, tok, answer: str, privileged: bool = False) -> float:
    """p('The answer is \\boxed{answer}') on the plain (or privileged) prompt of a toy problem, teacher-forced."""
    messages = build_messages(tiny_problems()[0], SYSTEM_PROMPT, "answer" if privileged else None)
    p = tok(render_prompt(tok, messages), add_special_tokens=False).input_ids
    r = tok(f"The answer is \\boxed{{{answer}}}", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits, _, ids = response_logits(model, [p], [r], tok.pad_token_id)
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).sum().exp().item()


def _metrics(trainer):
    return [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_answers_7_plainly_and_8_when_privileged(tiny_model_dir):
    model, tok = _load(tiny_model_dir)
    assert _prob_of_answer(model, tok, "7") > 0.9
    assert _prob_of_answer(model, tok, "8", privileged=True) > 0.9


def test_hdpo_moves_the_student_on_cliffs_where_grpo_cannot(tiny_model_dir, tmp_path):
    data = _data(tmp_path, {"8"})  # every prompt is a cliff for the plain policy
    model, tok = _load(tiny_model_dir)
    before = _prob_of_answer(model, tok, "8")

    grpo = _run(tmp_path, tiny_model_dir, "grpo", data, **{"hdpo.distill_weight": 0.0})
    rows = [r for r in _metrics(grpo) if r["kind"] == "train"]
    assert all(r["cliffs"] == 2 and r["grad_norm"] == 0.0 and r["privileged/generated"] == 0 for r in rows)
    for (n, a), b in zip(model.state_dict().items(), grpo.policy.state_dict().values()):
        assert torch.equal(a, b), f"GRPO changed {n} although every group was a cliff"

    hdpo = _run(tmp_path, tiny_model_dir, "hdpo", data)
    rows = [r for r in _metrics(hdpo) if r["kind"] == "train"]
    assert rows[0]["cliffs"] == 2 and rows[0]["reward/mean"] == 0.0
    assert sum(r["privileged/kept"] for r in rows) > 0
    assert all(math.isfinite(r["loss/jsd"]) for r in rows) and max(r["loss/jsd"] for r in rows) > 0
    assert max(r["tokens/distill"] for r in rows) > 0
    assert _prob_of_answer(hdpo.policy, tok, "8") > before  # pulled toward the privileged teacher
    assert rows[-1]["reward/mean"] > 0  # and the former cliff prompts now get rewards: GRPO takes over
    # the sampler's log-probs of the sampled tokens agree with the trainer's forward (same weights, float32)
    diffs = [r["logprob/sampler_vs_trainer_abs_diff"] for r in rows]
    assert any(x is not None for x in diffs) and all(x < 1e-3 for x in diffs if x is not None)


def test_training_runs_every_attention_without_cudnn(tiny_model_dir, tmp_path):
    """Rollouts, privileged rollouts, the teacher and the update forwards and backwards all meet new attention
    shapes every step, so a run keeps cuDNN attention (a graph compiled per shape) off, then restores it."""
    seen = []

    def record(module, args):
        if type(module).__name__.endswith("Attention"):
            seen.append((module.training, torch.backends.cuda.cudnn_sdp_enabled()))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        _run(tmp_path, tiny_model_dir, "hdpo", _data(tmp_path, {"8"}))
    finally:
        hook.remove()
    assert {training for training, _ in seen} == {True, False}  # updates and sampling were both seen
    assert not any(enabled for _, enabled in seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_speculative_privileged_rollouts_train_the_same(tiny_model_dir, tmp_path):
    """hdpo.privileged_start=speculative starts every prompt's privileged rollouts beside its rollouts and drops
    those of prompts with a correct rollout: the same samples, rewards, cliffs, losses and weights as starting
    them after the rollouts; only the dropped rows (counted) and their tokens differ."""
    data = _data(tmp_path, {"7", "8"})  # 7: solved plainly (no cliff: dropped), 8: a cliff
    a = _run(tmp_path, tiny_model_dir, "after", data)
    b = _run(tmp_path, tiny_model_dir, "ahead", data, **{"hdpo.privileged_start": "speculative"})
    rows_a, rows_b = (_metrics(t) for t in (a, b))
    extra = ("tokens/generated", "tokens/privileged", "privileged/dropped", "tokens/dropped")
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/") and k not in extra}  # noqa: E731
    for x, y in zip(rows_a, rows_b):
        assert strip(x).keys() == strip(y).keys()
        for k, v in strip(x).items():
            w = strip(y)[k]
            assert (v == pytest.approx(w, rel=1e-5, abs=1e-7)) if isinstance(v, float) else v == w, k
    train_a, train_b = ([r for r in rows if r["kind"] == "train"] for rows in (rows_a, rows_b))
    assert sum(r["cliffs"] for r in train_a) > 0 and sum(r["privileged/kept"] for r in train_a) > 0
    assert all(r["privileged/dropped"] == 0 for r in train_a)
    assert sum(r["privileged/dropped"] for r in train_b) > 0
    for x, y in zip(train_a, train_b):  # every decoded token counts, dropped ones too
        assert y["tokens/generated"] == x["tokens/generated"] + y["tokens/dropped"]
    for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_lambda_zero_is_exactly_grpo(tiny_model_dir, tmp_path):
    """lambda = 0: distillation items add exactly nothing to the loss and gradients (and lambda > 0 does add),
    and a run with lambda = 0 skips HDPO's phases whatever its teacher settings: no frozen copy, no privileged
    rollouts on its cliffs, the GRPO run's weights and metrics."""
    model, tok = _load(tiny_model_dir)
    items = _items(tok)
    distill = _distill_items(model, tok, items)
    n_grpo, n_distill = sum(len(r) for _, r, _ in items), sum(len(d.response_ids) for d in distill)

    def update(weight, with_distill):
        model.zero_grad(set_to_none=True)
        parts = accumulate_gradients(model, _grpo(items), distill if with_distill else [], (n_grpo, n_distill),
                                     Objective(weight), MicroBatching(3))
        return parts, _grads(model)

    (parts0, g0), (parts_none, g_none), (_, g_half) = update(0.0, True), update(0.0, False), update(0.5, True)
    assert parts0.jsd > 0 and parts0.grpo == parts_none.grpo
    assert all(torch.equal(g0[n], g_none[n]) for n in g_none)
    assert any(not torch.allclose(g_half[n], g_none[n]) for n in g_none)

    data = _data(tmp_path, {"7", "8"})
    a = _run(tmp_path, tiny_model_dir, "grpo", data, **{"hdpo.distill_weight": 0.0})
    b = _run(tmp_path, tiny_model_dir, "lambda0", data, **{"hdpo.distill_weight": 0.0, "hdpo.teacher": "frozen",
                                                           "hdpo.privileged_sampler": "teacher"})
    assert b.frozen is None
    train = [r for r in _metrics(b) if r["kind"] == "train"]
    assert sum(r["cliffs"] for r in train) > 0 and all(r["privileged/generated"] == 0 for r in train)
    for x, y in zip(a.policy.state_dict().values(), b.policy.state_dict().values()):
        assert torch.equal(x, y)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    assert strip(_metrics(a)) == strip(_metrics(b))


def test_frozen_teacher_stays_at_step_zero(tiny_model_dir, tmp_path):
    """The frozen teacher keeps the step-0 weights and is the one the JSD reads: at step 1 it equals the
    drifting teacher (same weights), so both runs agree; from step 2 on the policy has moved, the privileged
    rollouts (sampled by the policy) are the same in both runs, and only the teacher's distributions differ."""
    data = _data(tmp_path, {"8"})
    model, _ = _load(tiny_model_dir)
    steps = {"grpo.max_num_steps": 3, "eval.val_period": 3, "optimizer.lr": 1e-4}  # small steps: cliffs stay
    t = _run(tmp_path, tiny_model_dir, "frozen", data, **{"hdpo.teacher": "frozen"}, **steps)
    d = _run(tmp_path, tiny_model_dir, "drifting", data, **steps)
    assert t.frozen is not None and t.frozen is not t.policy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), t.frozen.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), t.policy.state_dict().values()))
    frozen, drifting = ([r for r in _metrics(x) if r["kind"] == "train"] for x in (t, d))
    assert frozen[0]["loss/jsd"] == pytest.approx(drifting[0]["loss/jsd"], rel=1e-6) and frozen[0]["loss/jsd"] > 0
    later = [(f, g) for f, g in zip(frozen[1:], drifting[1:]) if f["privileged/kept"] > 0]
    assert later, "no step after the first distilled anything"
    for f, g in later:
        assert f["privileged/kept"] == g["privileged/kept"] and f["tokens/distill"] == g["tokens/distill"]
        assert abs(f["loss/jsd"] - g["loss/jsd"]) > 1e-6 * max(f["loss/jsd"], g["loss/jsd"])


def test_only_correct_privileged_rollouts_are_distilled(tiny_model_dir, tmp_path):
    """The R = 1 filter: the tiny model answers 7 on the plain prompt and 8 on a privileged one, so a problem
    whose gold is 9 is a cliff whose privileged rollouts all fail: none kept, nothing distilled, while the
    gold-8 cliff beside it is distilled. Its tokens/distill counts the kept rollouts only."""
    from hdpo.data import Problem
    from hdpo.io import write_jsonl

    probs = [Problem("toy:eight", "Toy problem number 1: what is the magic number?", None, "8", "toy"),
             Problem("toy:nine", "Toy problem number 2: what is the magic number?", None, "9", "toy")]
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(data / "val.jsonl", [p.to_dict() for p in probs])
    t = _run(tmp_path, tiny_model_dir, "filter", data, **{"grpo.max_num_steps": 1})
    ledger = {r["id"]: r for r in map(json.loads, (t.work_dir / "cliffs.jsonl").read_text().splitlines())}
    K = t.cfg.grpo.num_generations_per_prompt
    nine, eight = ledger["toy:nine"], ledger["toy:eight"]
    assert nine["cliff"] and nine["privileged_generated"] == K
    assert nine["privileged_kept"] == 0 and not nine["distilled"] and nine["teacher_tail_mass"] is None
    assert eight["cliff"] and eight["privileged_kept"] > 0 and eight["distilled"]
    row = next(r for r in _metrics(t) if r["kind"] == "train")
    assert row["privileged/generated"] == 2 * K and row["privileged/kept"] == eight["privileged_kept"]
    max_new = t.cfg.generation.max_new_tokens
    assert 0 < row["tokens/distill"] <= eight["privileged_kept"] * max_new


def test_resume_continues_the_same_trajectory(tiny_model_dir, tmp_path):
    data = _data(tmp_path, {"7", "8"})
    full = _run(tmp_path, tiny_model_dir, "full", data, **{"grpo.max_num_steps": 3})
    # the same run killed after step 2 (its last checkpoint), then resumed to step 3
    _run(tmp_path, tiny_model_dir, "cut", data, **{"grpo.max_num_steps": 2})
    resumed = _run(tmp_path, tiny_model_dir, "cut", data, resume=True, **{"grpo.max_num_steps": 3})
    for x, y in zip(full.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(x, y)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    assert strip(_metrics(full)) == strip(_metrics(resumed))
    summary = json.loads((resumed.run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and (resumed.run_dir / "policy_final" / "hdpo_meta.json").exists()
    # the kept best policy: the first trained step with the highest validation pass@1 (step 0 never counts)
    trained = [r for r in _metrics(full) if r["kind"] == "val" and r["step"] > 0]
    top = max(r["val/pass@1"] for r in trained)
    want = min(r["step"] for r in trained if r["val/pass@1"] == top)
    for t in (full, resumed):
        meta = json.loads((t.run_dir / "policy_best" / "hdpo_meta.json").read_text())
        assert meta["model_step"] == want and meta["checkpoint"] == "best"
        assert json.loads((t.run_dir / "summary.json").read_text())["best_checkpoint_step"] == want


def _train_rank(rank, world, model_dir, data, out, port):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trackers = {"tracking.backends": ["mlflow"], "tracking.mlflow_tracking_uri": (out / "mlruns").as_uri()}
    cfg = tiny_config(model_dir, **{"grpo.num_prompts_per_step": 4}, **(trackers if have_mlflow() else {}))
    trainer = Trainer(cfg, data, out / "runs" / "ddp", out / "work" / "ddp", out / "models")
    trainer.fit()
    if rank == 1:  # every rank ends with the same weights: gradients are summed over ranks
        torch.save(trainer.policy.state_dict(), out / "rank1.pt")
    torch.distributed.barrier()
    if rank == 0:
        torch.save(trainer.policy.state_dict(), out / "rank0.pt")
    torch.distributed.destroy_process_group()


def test_two_rank_training_runs_under_gloo(tiny_model_dir, tmp_path, monkeypatch):
    """The whole trainer as two data-parallel processes (what torchrun launches): global counts, cliffs and
    validation gathered over ranks, identical weights on both ranks, outputs written once."""
    import socket

    data = _data(tmp_path, {"7", "8"})
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for an opt-in to file stores
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_rank, args=(2, str(tiny_model_dir), str(data), tmp_path, port), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    rows = [json.loads(l) for l in (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    # 4 prompts per step over 2 ranks: the counts are global, and the generated tokens too
    assert all(r["cliffs"] <= 4 and r["cliff_fraction"] * 4 == r["cliffs"] for r in train)
    assert all(r["tokens/grpo"] > 0 for r in train)
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 2] and all(r["val/num_problems"] == 2 for r in val)
    if have_mlflow():  # only rank 0 logs: one tracker run, each step once
        from mlflow.tracking import MlflowClient

        client = MlflowClient((tmp_path / "mlruns").as_uri())
        (run,) = client.search_runs([client.get_experiment_by_name("hdpo").experiment_id])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [1, 2]


def have_mlflow() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None
