"""The transformers backend's decode loop (hdpo.decode): continuous batching changes no sample.

Brute-force references: one request decoded alone, and the model's own full forward over prompt + response.
Rows leave the batch, longer prompts join a running batch, the cache outgrows its room, follow-ups are
queued by `on_done`, or dropped by it: every sample, log-prob and finished flag stays the same.
"""
from __future__ import annotations

import pytest
import torch

from hdpo.decode import Request, decode
from hdpo.generation import Generator, Sampling, Speculation, TransformersGenerator

EOS, PAD, V = 1, 0, 300


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=EOS, pad_token_id=PAD)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(6.0)  # some tokens likely, EOS now and then
    return m


def requests(count: int, seed: int = 0) -> list[Request]:
    """Prompts of 3 to 40 tokens (long ones late, so they join a running batch) and limits of 5 to 170
    (past the cache's first 128 columns of room)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        plen = 3 + (i * 7) % 38
        limit = 170 if i % 3 == 1 else 5 + (i * 37) % 120
        out.append(Request(torch.randint(2, V, (plen,), generator=g).tolist(), limit, 1000 + i))
    return out


def run(model, reqs, batch_size, check_every=8, **kw):
    return decode(model, reqs, 1.0, 1.0, False, batch_size, [EOS], PAD, check_every=check_every, **kw)


def test_continuous_batching_changes_no_sample(model):
    reqs = requests(13)
    alone = [run(model, [r], 1)[0] for r in reqs]
    assert any(d.finished for d in alone) and any(not d.finished for d in alone)  # both kinds of ending
    assert any(len(d.response_ids) > 128 for d in alone)  # the cache grew past its first room
    for batch_size, every in ((13, 8), (4, 8), (3, 1), (5, 5)):
        got = run(model, reqs, batch_size, check_every=every)
        for a, b in zip(alone, got):
            assert a.response_ids == b.response_ids and a.finished == b.finished
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_every_forward_runs_without_cudnn_attention(model):
    """cuDNN attention compiles a graph per new shape and the key length grows every step, so the loop turns
    that backend off for its forwards, and back to what it was afterwards."""
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    try:
        for before in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(before)
            seen.clear()
            run(model, requests(5), 3)
            assert len(seen) > 5 and not any(seen)
            assert torch.backends.cuda.cudnn_sdp_enabled() is before
    finally:
        hook.remove()
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_rows_stop_at_eos_or_their_own_limit(model):
    for r, d in zip(requests(13), run(model, requests(13), 4)):
        assert len(d.response_ids) <= r.limit
        assert d.finished == (d.response_ids[-1] == EOS) and EOS not in d.response_ids[:-1]
        assert d.finished or len(d.response_ids) == r.limit


def test_logprobs_are_the_full_forwards(model):
    """Each recorded log-prob is log_softmax of the model's own forward over prompt + response, with no cache."""
    reqs = requests(6)
    for r, d in zip(reqs, run(model, reqs, 3)):
        ids = torch.tensor([r.prompt_ids + d.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(r.prompt_ids) - 1:-1].float(), -1)
        want = logp.gather(1, torch.tensor(d.response_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(d.logprobs), want, atol=2e-5, rtol=0)


def test_follow_ups_are_the_requests_decoded_alone(model):
    """`on_done` queues a follow-up when request 2 ends: it gets the next index and the same tokens as alone."""
    reqs = requests(7)
    extra = Request([5, 6, 7, 8] * 9, 40, 77)
    seen = []

    def on_done(done):
        seen.extend(i for i, _ in done)
        return ([extra] if any(i == 2 for i, _ in done) else []), []

    got = run(model, reqs, 3, on_done=on_done)
    assert len(got) == 8 and sorted(seen) == list(range(8))
    assert got[7].response_ids == run(model, [extra], 1)[0].response_ids
    assert [d.response_ids for d in got[:7]] == [d.response_ids for d in run(model, reqs, 7)]


def test_dropped_requests_stop_and_the_others_do_not_change(model):
    """`on_done` drops a running request and a queued one when request 0 ends: the running one keeps a prefix
    of its tokens, the queued one none, both marked; every other request is decoded as without the drops."""
    reqs = requests(9)
    full = run(model, reqs, 9)
    first = min(range(9), key=lambda i: len(full[i].response_ids))  # ends first: at the first harvest
    long = max(range(9), key=lambda i: len(full[i].response_ids))

    def on_done(done):
        return [], ([long, 8] if any(i == first for i, _ in done) else [])

    got = run(model, reqs, 5, on_done=on_done)  # request 8 waits in the queue at the first harvest
    assert got[long].dropped and got[8].dropped and not got[8].response_ids
    assert not got[long].finished and 0 < len(got[long].response_ids) < len(full[long].response_ids)
    assert got[long].response_ids == full[long].response_ids[:len(got[long].response_ids)]
    for i in set(range(9)) - {long, 8}:
        assert not got[i].dropped and got[i].response_ids == full[i].response_ids


@pytest.fixture(scope="module")
def text_model(tokenizer_dir):
    """The real SmolLM2 tokenizer and a random model of its vocabulary, so generate_then runs as in training:
    text prompts tokenized, responses decoded. Its EOS row is scaled up so that rollouts end at all lengths
    (about half before 48 tokens), as real ones do: rows leave the batch and join it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0.7 * torch.randn(32, generator=torch.Generator().manual_seed(5))
    return model, tok


def words(seed: int, count: int, step: int) -> list[str]:
    """`count` prompts of ordinary words, 4, 4 + step, ... words long."""
    vocab = "the cat sat on a mat while two dogs ran past seven red cars and one blue bus".split()
    g = torch.Generator().manual_seed(seed)
    return [" ".join(vocab[int(t)] for t in torch.randint(0, len(vocab), (4 + step * i,), generator=g))
            for i in range(count)]


def test_generate_then_overlapped_equals_two_phases(text_model):
    """The transformers backend runs follow-ups inside the loop; `Generator.generate_then` (the default every
    backend has) runs them after: the same groups and follow-ups, for the same seeds."""
    gen = TransformersGenerator(*text_model, batch_size=6, max_total_length=400)
    prompts = words(1, 5, 5)
    s = Sampling(max_new_tokens=60)
    then = lambda i, group: (prompts[i] + " The answer is 9.") if i % 2 == 0 else None  # noqa: E731
    a_groups, a_more = gen.generate_then(prompts, 3, s, then, 2, seeds=[11, 12, 13, 14, 15])
    b_groups, b_more = Generator.generate_then(gen, prompts, 3, s, then, 2, seeds=[11, 12, 13, 14, 15])
    assert sorted(a_more) == sorted(b_more) == [0, 2, 4]
    ids = lambda groups: [[r.response_ids for r in g] for g in groups]  # noqa: E731
    assert ids(a_groups) == ids(b_groups)
    assert ids(a_more.values()) == ids(b_more.values())
    assert [[r.finished for r in g] for g in a_groups] == [[r.finished for r in g] for g in b_groups]
    ended = [r.finished for g in a_groups + list(a_more.values()) for r in g]
    assert any(ended) and not all(ended)  # rows left the batch early, and others ran to the limit
    assert len({tuple(r.response_ids) for g in a_more.values() for r in g}) > 1


def test_speculative_follow_ups_are_the_same_in_fewer_steps(text_model):
    """With `speculate`, every prompt's follow-ups start beside the rollouts and a prompt's are dropped once one
    of its rollouts rules them out: the same groups and follow-ups as the two phases one after the other, in
    fewer decoding steps, and the dropped rows are counted."""
    model, tok = text_model
    gen = TransformersGenerator(model, tok, batch_size=64, max_total_length=400)
    prompts = words(2, 6, 3)
    s = Sampling(max_new_tokens=48)
    follow = {i: p + " The answer is 9." for i, p in enumerate(prompts)}
    good = lambda r: r.response_ids[0] % 7 == 0  # noqa: E731  (a 'correct' rollout: no follow-ups needed)
    then = lambda i, group: None if any(map(good, group)) else follow[i]  # noqa: E731
    seeds = [21, 22, 23, 24, 25, 26]

    def steps(**kw):  # decoding steps: forwards of the model
        calls = []
        hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            return gen.generate_then(prompts, 4, s, then, 3, seeds=seeds, **kw), len(calls)
        finally:
            hook.remove()

    spec = Speculation(follow, lambda done: {i for i, _, r in done if good(r)})
    (a_groups, a_more), a_steps = steps(speculate=spec)
    (b_groups, b_more), b_steps = steps()
    ids = lambda groups: [[r.response_ids for r in g] for g in groups]  # noqa: E731
    assert ids(a_groups) == ids(b_groups)
    assert sorted(a_more) == sorted(b_more) and 0 < len(a_more) < len(prompts)  # some prompts need follow-ups
    assert ids(a_more.values()) == ids(b_more.values())
    assert spec.dropped_rows == 3 * (len(prompts) - len(a_more)) and spec.dropped_tokens > 0
    # some follow-ups were dropped mid-flight, before their token limit, or before they started
    assert spec.dropped_tokens < spec.dropped_rows * s.max_new_tokens
    assert any(r.finished for g in a_groups for r in g) and not all(r.finished for g in a_groups for r in g)
    assert a_steps < b_steps
    # the default (every other backend) runs the two phases whatever `speculate` asks: the same samples again
    c_groups, c_more = Generator.generate_then(gen, prompts, 4, s, then, 3, seeds=seeds,
                                               speculate=Speculation(follow, lambda done: ()))
    assert ids(c_groups) == ids(a_groups) and ids(c_more.values()) == ids(a_more.values())


def test_speculative_follow_ups_too_long_for_the_context_are_empty_or_dropped(text_model, caplog):
    """A follow-up prompt with no room under max_total_length gets an empty rollout, as after the rollouts;
    dropping it (its prompt solved) is no error and no warning, and the other prompts' follow-ups are unchanged."""
    gen = TransformersGenerator(*text_model, batch_size=8, max_total_length=40)
    prompts = ["the cat sat", "two dogs ran past", "a red car"]
    follow = {0: "the cat " * 30, 1: "two dogs " * 30, 2: "a red car and a blue bus"}  # 0, 1: over 40 tokens
    s = Sampling(max_new_tokens=12)
    then = lambda i, group: follow[i] if i != 0 else None  # noqa: E731  (prompt 0 is solved)
    spec = Speculation(follow, lambda done: {0} if any(i == 0 for i, _, _ in done) else set())
    with caplog.at_level("WARNING"):
        a_groups, a_more = gen.generate_then(prompts, 2, s, then, 2, seeds=[1, 2, 3], speculate=spec)
        b_groups, b_more = gen.generate_then(prompts, 2, s, then, 2, seeds=[1, 2, 3])
    no_room = [r.getMessage() for r in caplog.records if "no room" in r.getMessage()]
    assert len(no_room) == 2 and all(m.startswith("2 rollout(s)") for m in no_room)  # prompt 1's, in each run
    assert sorted(a_more) == sorted(b_more) == [1, 2]
    assert all(r.response_ids == [] and not r.finished for r in a_more[1])
    ids = lambda groups: [[r.response_ids for r in g] for g in groups]  # noqa: E731
    assert ids(a_groups) == ids(b_groups) and ids(a_more.values()) == ids(b_more.values())
    assert spec.dropped_rows == 0 and spec.dropped_tokens == 0  # prompt 0's never started: nothing spent
