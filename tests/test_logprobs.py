"""Chunked log-probs / top-k JSD from hidden states = the full-logits functions (values and gradients);
packed and padded forwards = separate forwards; token-budget plans cover every sequence once, under budget."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hdpo.logprobs import (chunked_token_logprobs, chunked_topk, chunked_topk_jsd, output_projection,
                           plan_micro_batches, response_hidden)
from hdpo.losses import token_logprobs, topk_jsd


def _random_model(vocab=300, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _leaves(N=37, H=16, V=301, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    return h, w, b


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_logprobs_equal_full_logits_with_gradients(chunk, temperature):
    h, w, b = _leaves()
    ids = torch.randint(0, w.shape[0], (h.shape[0], 3), generator=torch.Generator().manual_seed(1))
    g_out = torch.randn(h.shape[0], 3, generator=torch.Generator().manual_seed(2))

    ref = token_logprobs((h @ w.T + b) / temperature, ids)
    (ref * g_out).sum().backward()
    ref_grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None

    got = chunked_token_logprobs(h, w, b, ids, temperature=temperature, chunk=chunk)
    (got * g_out).sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip((h.grad, w.grad, b.grad), ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_chunked_jsd_and_teacher_topk_equal_full_logits(temperature):
    h, w, _ = _leaves(bias=False)
    t_h, _, _ = _leaves(seed=5)
    k = 7
    # the teacher's top-k as today: the full logits, then topk; chunked: the same values and ids
    t_logits = (t_h.detach() @ w.detach().T) / temperature
    ref_vals, ref_ids = t_logits.topk(k, -1)
    vals, ids = chunked_topk(t_h.detach(), w.detach(), None, k, temperature=temperature, chunk=5)
    torch.testing.assert_close(vals, ref_vals)
    assert torch.equal(ids, ref_ids)

    ref = topk_jsd(ref_vals, token_logprobs((h @ w.T) / temperature, ref_ids))
    ref.sum().backward()
    ref_grads = [h.grad.clone(), w.grad.clone()]
    h.grad = w.grad = None
    got = chunked_topk_jsd(h, w, None, ids, vals, temperature=temperature, chunk=6)
    got.sum().backward()
    assert got.shape == (h.shape[0],) and (got > 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, ref_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, ref_grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_teacher_tail_mass_is_the_softmax_mass_outside_its_topk(chunk, temperature):
    """The ledger's teacher_tail_mass: per position, the mass of softmax(logits / T) outside the top-k tokens,
    summed token by token over the rest of the vocabulary (and 0 when k is the whole vocabulary)."""
    t_h, w, b = (x.detach() for x in _leaves(seed=3))
    probs = torch.softmax((t_h @ w.T + b).double() / temperature, -1)
    k = 5
    _, ids, tails = chunked_topk(t_h, w, b, k, temperature=temperature, chunk=chunk, with_tail=True)
    outside = torch.ones_like(probs, dtype=torch.bool).scatter_(-1, ids, False)
    brute = torch.stack([probs[n][outside[n]].sum() for n in range(probs.shape[0])]).float()
    torch.testing.assert_close(tails, brute, rtol=1e-5, atol=1e-6)
    assert tails.min() > 0.01  # a real cut (the random logits spread their mass)
    *_, none_left = chunked_topk(t_h, w, b, w.shape[0], temperature=temperature, chunk=chunk, with_tail=True)
    assert none_left.abs().max() < 1e-6


def test_no_full_vocabulary_tensor_is_kept_for_backward():
    """The autograd graph holds no [N, V] tensor: the saved tensors are the inputs and [chunk, ...] pieces."""
    h, w, _ = _leaves(N=64, H=8, V=5000, bias=False)
    ids = torch.randint(0, 5000, (64, 1))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_token_logprobs(h, w, None, ids, chunk=16).sum()
    assert saved and all(n not in (64 * 5000, 16 * 5000) for n in saved)  # no [N, V] nor [chunk, V] logits


def test_packed_and_padded_hidden_states_equal_separate_forwards():
    model = _random_model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (5, 9, 2, 7)]
    responses = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (4, 1, 8, 3)]
    with torch.no_grad():
        ref = torch.cat([model(torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1]
                         for p, r in zip(prompts, responses)])
        w, b = output_projection(model)
        for pack in (False, True):
            h, targets = response_hidden(model, prompts, responses, pad_id=0, pack=pack)
            assert targets.tolist() == [t for r in responses for t in r]
            torch.testing.assert_close(h @ w.T, ref, rtol=1e-4, atol=1e-5)


def test_packing_does_not_leak_attention_across_sequences():
    """Changing an earlier packed sequence leaves a later one's hidden states unchanged (and changes its own)."""
    model = _random_model()
    a, b = [[5, 6, 7], [8, 9]], [[11, 12], [13, 14, 15]]
    with torch.no_grad():
        h1, _ = response_hidden(model, [a[0], b[0]], [a[1], b[1]], 0, pack=True)
        h2, _ = response_hidden(model, [[1, 2, 3], b[0]], [[4, 4], b[1]], 0, pack=True)
    torch.testing.assert_close(h1[2:], h2[2:])
    assert not torch.allclose(h1[:2], h2[:2])


@pytest.mark.parametrize("pack", [False, True])
def test_plans_cover_each_sequence_once_under_the_budget(pack):
    lengths = [30, 5, 17, 17, 60, 2, 9, 40, 11]
    for max_seqs, budget in ((4, None), (8, 64), (2, 50), (100, 1)):
        plan = plan_micro_batches(lengths, max_seqs, budget, pack)
        assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
        for mb in plan:
            assert len(mb) <= max_seqs
            cost = sum(lengths[i] for i in mb) if pack else len(mb) * max(lengths[i] for i in mb)
            assert budget is None or cost <= budget or len(mb) == 1
        # longest first, so padding is between neighbours in length
        flat = [lengths[i] for mb in plan for i in mb]
        assert flat == sorted(lengths, reverse=True)
    assert len(plan_micro_batches(lengths, 100, 1000, pack)) == 1


def test_activation_checkpointing_keeps_losses_and_gradients():
    from hdpo.models import enable_activation_checkpointing
    from hdpo.update import DistillItem, GrpoItem, MicroBatching, Objective, accumulate_gradients

    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (6, 3, 9)]
    responses = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (5, 7, 2)]
    grpo = [GrpoItem(p, r, a) for p, r, a in zip(prompts, responses, (1.0, -0.5, 2.0))]
    distill = [DistillItem(p, r, torch.randn(len(r), 4, generator=g), torch.randint(0, 300, (len(r), 4), generator=g))
               for p, r in zip(prompts, responses)]
    results = []
    for ckpt in (False, True):
        model = _random_model().train()
        if ckpt:
            enable_activation_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        parts = accumulate_gradients(model, grpo, distill, (14.0, 14.0), Objective(0.3, temperature=0.8),
                                     MicroBatching(2))
        results.append((parts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (p0, g0), (p1, g1) = results
    assert p1.grpo == pytest.approx(p0.grpo, rel=1e-6) and p1.jsd == pytest.approx(p0.jsd, rel=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)
