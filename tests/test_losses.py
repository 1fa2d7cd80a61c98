"""The loss math against brute-force references."""
import itertools
import math
import statistics

import pytest
import torch

from hdpo.losses import grpo_token_loss_sum, leave_one_out_advantages, token_logprobs, topk_jsd


def full_jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """1/2 KL(P||M) + 1/2 KL(Q||M) over the full vocabulary, with 0 log 0 = 0 (float64)."""
    m = (p + q) / 2

    def kl(a, b):
        terms = torch.where(a > 0, a * (torch.log(a) - torch.log(b)), torch.zeros_like(a))
        return terms.sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def truncated_teacher(teacher_logits: torch.Tensor, k: int):
    vals, ids = teacher_logits.topk(k, dim=-1)
    p = torch.zeros_like(teacher_logits)
    p.scatter_(-1, ids, torch.softmax(vals, -1))
    return p, vals, ids


@pytest.mark.parametrize("k", [1, 3, 8, 31])
def test_topk_jsd_equals_full_jsd_with_truncated_teacher(k):
    torch.manual_seed(k)
    V = 32
    t_logits = torch.randn(5, 7, V, dtype=torch.float64) * 3
    s_logits = torch.randn(5, 7, V, dtype=torch.float64) * 3
    p, vals, ids = truncated_teacher(t_logits, k)
    q = torch.softmax(s_logits, -1)
    ours = topk_jsd(torch.log_softmax(t_logits, -1).gather(-1, ids), token_logprobs(s_logits, ids))
    torch.testing.assert_close(ours.double(), full_jsd(p, q), rtol=1e-5, atol=1e-6)


def test_topk_jsd_is_plain_jsd_when_k_is_vocab():
    torch.manual_seed(0)
    V = 16
    t_logits, s_logits = torch.randn(4, V, dtype=torch.float64), torch.randn(4, V, dtype=torch.float64)
    _, ids = t_logits.topk(V, -1)
    ours = topk_jsd(t_logits.gather(-1, ids), token_logprobs(s_logits, ids))
    ref = full_jsd(torch.softmax(t_logits, -1), torch.softmax(s_logits, -1))
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)


def test_topk_jsd_zero_for_equal_and_bounded_by_ln2():
    torch.manual_seed(1)
    logits = torch.randn(3, 10)
    _, ids = logits.topk(10, -1)
    lp = token_logprobs(logits, ids)
    assert topk_jsd(lp, lp).abs().max() < 1e-6
    # disjoint supports give the maximum, ln 2
    t = torch.full((1, 6), -1e4)
    t[0, 0] = 0.0
    s = torch.full((1, 6), -1e4)
    s[0, 5] = 0.0
    _, ids = t.topk(1, -1)
    val = topk_jsd(token_logprobs(t, ids), token_logprobs(s, ids))
    assert val.item() == pytest.approx(math.log(2), abs=1e-4)
    assert val.item() <= math.log(2) + 1e-6


def test_topk_jsd_gradient_reaches_student_only():
    torch.manual_seed(2)
    t_logits = torch.randn(6, 20, requires_grad=True)
    s_logits = torch.randn(6, 20, requires_grad=True)
    vals, ids = t_logits.topk(4, -1)
    loss = topk_jsd(torch.log_softmax(t_logits, -1).gather(-1, ids), token_logprobs(s_logits, ids)).sum()
    loss.backward()
    assert t_logits.grad is None or t_logits.grad.abs().sum() == 0
    assert s_logits.grad.abs().sum() > 0
    # and the student gradient matches autograd on the brute-force full-vocab JSD
    s2 = s_logits.detach().double().requires_grad_(True)
    p, _, _ = truncated_teacher(t_logits.detach().double(), 4)
    full_jsd(p, torch.softmax(s2, -1)).sum().backward()
    torch.testing.assert_close(s_logits.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def _adv_reference(row: list[float], i: int, normalize: bool, rule: str, loo: bool = True) -> float:
    """One rollout's advantage, straight from the definitions (statistics.stdev is the unbiased std)."""
    others = row[:i] + row[i + 1:]
    base_set = others if loo else row
    adv = row[i] - sum(base_set) / len(base_set)
    if not normalize:
        return adv
    std_set = row if rule == "group" else base_set
    sd = statistics.stdev(std_set) if len(std_set) > 1 else 0.0
    return adv / (sd + 1e-6) if sd > 0 else adv


@pytest.mark.parametrize("rule", ["nemo_rl", "group"])
@pytest.mark.parametrize("loo", [True, False])
def test_advantages_brute_force(rule, loo):
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0],
                            [0.5, 0.0, 1.0, 0.25], [1.0, 0.0, 0.0, 0.0]])
    for normalize in (False, True):
        adv = leave_one_out_advantages(rewards, normalize=normalize, leave_one_out=loo, std=rule)
        for g, row in enumerate(rewards.tolist()):
            for i in range(4):
                assert adv[g, i].item() == pytest.approx(_adv_reference(row, i, normalize, rule, loo), abs=1e-5)


# K = 16, c correct: (advantage of a correct rollout, of a wrong one), by hand.
# NeMo-RL: a correct rollout sees c-1 correct among 15 others: baseline (c-1)/15, unbiased std
# sqrt((c-1)(16-c)/(15*14)); a wrong one sees c correct among 15: baseline c/15, std sqrt(c(15-c)/(15*14)).
# std 0 (c = 1 for the correct one, c = 15 for the wrong one) leaves r - baseline unscaled: +1 and -1.
# Group std: sqrt(c(16-c)/(16*15)) for every rollout, e.g. c = 1: (1 - 0)/0.25 = +4.
NEMO_K16 = {1: (1.0, -(1 / 15) / math.sqrt(14 / 210)), 2: ((14 / 15) / math.sqrt(14 / 210), -(2 / 15) / math.sqrt(26 / 210)),
            8: ((8 / 15) / math.sqrt(56 / 210), -(8 / 15) / math.sqrt(56 / 210)),
            15: ((1 / 15) / math.sqrt(14 / 210), -1.0)}
GROUP_K16 = {1: (4.0, -(1 / 15) / 0.25), 2: ((14 / 15) / math.sqrt(28 / 240), -(2 / 15) / math.sqrt(28 / 240)),
             8: ((8 / 15) / math.sqrt(64 / 240), -(8 / 15) / math.sqrt(64 / 240)),
             15: ((1 / 15) / 0.25, -4.0)}


@pytest.mark.parametrize("correct", [1, 2, 8, 15])
def test_advantages_k16_hand_computed(correct):
    rewards = torch.tensor([[1.0] * correct + [0.0] * (16 - correct)])
    for rule, table in (("nemo_rl", NEMO_K16), ("group", GROUP_K16)):
        adv = leave_one_out_advantages(rewards, std=rule)[0]
        want_right, want_wrong = table[correct]
        assert adv[0].item() == pytest.approx(want_right, rel=1e-5), rule
        assert adv[-1].item() == pytest.approx(want_wrong, rel=1e-5), rule
    # the values the issue quotes: NeMo-RL +1.00 / -1.00 / +3.62; whole-group std +4.00 / -4.00 / +2.73
    assert round(NEMO_K16[1][0], 2) == 1.00 and round(GROUP_K16[1][0], 2) == 4.00
    assert round(NEMO_K16[15][1], 2) == -1.00 and round(GROUP_K16[15][1], 2) == -4.00
    assert round(NEMO_K16[2][0], 2) == 3.61 and round(GROUP_K16[2][0], 2) == 2.73


def test_advantages_default_is_nemo_rl_and_k2_unscaled():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(leave_one_out_advantages(r), leave_one_out_advantages(r, std="nemo_rl"))
    # K = 2: one other reward, no leave-one-out std (NeMo-RL: nan -> 0): r_i - r_j unscaled
    assert leave_one_out_advantages(torch.tensor([[1.0, 0.0]])).tolist() == [[1.0, -1.0]]
    with pytest.raises(ValueError, match="std rule"):
        leave_one_out_advantages(r, std="batch")


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_grpo_gradient_exactly_zero_on_a_cliff(value):
    """All K rewards equal -> every advantage is 0 -> the GRPO gradient vanishes (what HDPO fills in)."""
    torch.manual_seed(3)
    logits = torch.randn(4, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (4, 5, 1))
    lp = token_logprobs(logits, ids).squeeze(-1)
    adv = leave_one_out_advantages(torch.full((1, 4), value)).view(-1)
    assert torch.equal(adv, torch.zeros(4))
    loss = grpo_token_loss_sum(lp, lp.detach(), adv, torch.ones(4, 5))
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_grpo_loss_brute_force_with_clipping():
    torch.manual_seed(4)
    lp = torch.randn(3, 4) * 0.3
    old = torch.randn(3, 4) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.2])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    ref = 0.0
    for b, t in itertools.product(range(3), range(4)):
        if mask[b, t]:
            r = math.exp(lp[b, t] - old[b, t])
            ref -= min(r * adv[b].item(), min(max(r, 0.8), 1.2) * adv[b].item())
    assert grpo_token_loss_sum(lp, old, adv, mask).item() == pytest.approx(ref, rel=1e-5)


def test_grpo_on_policy_gradient_is_advantage_weighted_logprob_gradient():
    """With old = current (one update per step), grad = -sum A * grad log pi: the REINFORCE form."""
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3, 1))
    adv = torch.tensor([0.5, -2.0])
    lp = token_logprobs(logits, ids).squeeze(-1)
    grpo_token_loss_sum(lp, lp.detach(), adv, torch.ones(2, 3)).backward()
    g1 = logits.grad.clone()
    logits.grad = None
    lp = token_logprobs(logits, ids).squeeze(-1)
    (-(lp * adv[:, None]).sum()).backward()
    torch.testing.assert_close(g1, logits.grad)


def test_token_logprobs_matches_log_softmax():
    logits = torch.randn(3, 4, 9)
    ids = torch.randint(0, 9, (3, 4, 2))
    torch.testing.assert_close(token_logprobs(logits, ids), torch.log_softmax(logits, -1).gather(-1, ids))


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_sampler_correction_weights_brute_force(mode):
    from hdpo.losses import sampler_correction_weights

    g = torch.Generator().manual_seed(3)
    lengths = [3, 1, 5, 2]
    trainer = -torch.rand(sum(lengths), generator=g, dtype=torch.float64) * 3
    sampler = trainer + torch.randn(sum(lengths), generator=g, dtype=torch.float64) * 0.6
    cap = 1.5
    w, capped = sampler_correction_weights(trainer, sampler, lengths, mode, cap)
    expected, flags, pos = [], [], 0
    for n in lengths:
        ratios = [math.exp(trainer[pos + t].item() - sampler[pos + t].item()) for t in range(n)]
        if mode == "token":
            expected += [min(r, cap) for r in ratios]
            flags += [r > cap for r in ratios]
        else:
            seq = math.prod(ratios)
            expected += [min(seq, cap)] * n
            flags.append(seq > cap)
        pos += n
    assert w.tolist() == pytest.approx(expected, rel=1e-12)
    assert capped.tolist() == flags and any(flags) and not all(flags)  # the draw exercises both sides of the cap
    none, _ = sampler_correction_weights(trainer, sampler, lengths, "none", cap)
    assert torch.equal(none, torch.ones_like(trainer))
    with pytest.raises(ValueError, match="tokens"):
        sampler_correction_weights(trainer, sampler, lengths[:-1], mode, cap)


def test_weighted_grpo_gradient_is_each_tokens_weight_times_its_plain_gradient():
    """On-policy (ratio 1) the weighted surrogate's gradient is -sum_t w_t A grad log p_t, and the weights carry
    no gradient of their own."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 4, 1), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float64)
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    w = torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.5
    lp = token_logprobs(logits, ids).squeeze(-1)
    grpo_token_loss_sum(lp, lp.detach(), adv, mask, 0.2, 0.2, weights=w).backward()
    got = logits.grad.clone()
    logits.grad = None
    lp = token_logprobs(logits, ids).squeeze(-1)
    (-(w * adv[:, None] * lp * mask).sum()).backward()
    torch.testing.assert_close(got, logits.grad, rtol=1e-12, atol=1e-14)
