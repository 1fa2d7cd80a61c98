"""The sign test of the distillation term: a few AdamW steps of lambda * JSD alone, toward a teacher's fixed top-k
targets on the privileged prompt, must lower the JSD and raise the student's plain-prompt likelihood of the
teacher's responses. The same check must fail when the mechanism is broken (the JSD's sign flipped, the top-k ids
scrambled, the teacher's targets one position off), so it is shown to catch each break."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_problems
from hdpo.config import SYSTEM_PROMPT
from hdpo.data import build_messages, render_prompt
from hdpo.logprobs import chunked_token_logprobs, chunked_topk_jsd, output_projection
from hdpo.update import DistillItem, MicroBatching, Objective, accumulate_gradients, teacher_topk

STEPS, K = 6, 16


def _items(model, tok, break_with: str | None) -> list[DistillItem]:
    """The privileged teacher's answer (\\boxed{8}) to three toy problems and its top-k along it, as the trainer
    builds them; `break_with` damages the targets the way a bug would."""
    plain, priv, responses = [], [], []
    for p in tiny_problems()[:3]:
        plain.append(tok(render_prompt(tok, build_messages(p, SYSTEM_PROMPT)), add_special_tokens=False).input_ids)
        priv.append(tok(render_prompt(tok, build_messages(p, SYSTEM_PROMPT, "answer")),
                        add_special_tokens=False).input_ids)
        responses.append(tok("The answer is \\boxed{8}", add_special_tokens=False).input_ids + [tok.eos_token_id])
    topk = teacher_topk(model, priv, responses, K, MicroBatching(4, pad_id=tok.pad_token_id))
    items = []
    for p, r, (vals, ids) in zip(plain, responses, topk):
        if break_with == "scrambled_ids":
            ids = ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(0))]
        elif break_with == "shifted_targets":  # position t holds the teacher's top-k for token t + 1
            vals, ids = torch.cat([vals[1:], vals[-1:]]), torch.cat([ids[1:], ids[-1:]])
        items.append(DistillItem(p, r, vals, ids))
    return items


@torch.no_grad()
def _measure(model, items: list[DistillItem], reference: list[DistillItem]) -> tuple[float, float]:
    """Mean JSD to the (intact) teacher targets and mean log-likelihood of the responses on the plain prompts."""
    weight, bias = output_projection(model)
    micro = MicroBatching(8)
    hidden, ids = micro.hidden(model, [d.prompt_ids for d in items], [d.response_ids for d in items])
    jsd = chunked_topk_jsd(hidden, weight, bias, torch.cat([d.topk_ids for d in reference]),
                           torch.cat([d.topk_logits for d in reference]))
    ll = chunked_token_logprobs(hidden, weight, bias, ids[:, None]).squeeze(-1)
    return float(jsd.mean()), float(ll.sum()) / len(items)


def distill_run(model_dir, break_with: str | None = None) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    reference = _items(model, tok, None)
    items = reference if break_with is None else _items(model, tok, break_with)
    weight = -1.0 if break_with == "flipped_sign" else 1.0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    before = _measure(model, items, reference)
    n = float(sum(len(d.response_ids) for d in items))
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        accumulate_gradients(model, [], items, (1.0, n), Objective(weight), MicroBatching(2, pad_id=tok.pad_token_id))
        opt.step()
    after = _measure(model, items, reference)
    return {"jsd": (before[0], after[0]), "loglik": (before[1], after[1])}


def distillation_works(r: dict) -> bool:
    """The JSD to the teacher at least halves and the plain-prompt log-likelihood of its responses rises by at
    least one nat per response."""
    (jsd0, jsd1), (ll0, ll1) = r["jsd"], r["loglik"]
    return jsd1 < 0.5 * jsd0 and ll1 > ll0 + 1.0


def test_distillation_pulls_the_plain_prompt_student_toward_the_privileged_teacher(tiny_model_dir):
    r = distill_run(tiny_model_dir)
    assert r["jsd"][0] > 0.05, "the plain and privileged prompts should disagree before distillation"
    assert distillation_works(r), r


@pytest.mark.parametrize("break_with", ["flipped_sign", "scrambled_ids", "shifted_targets"])
def test_the_sign_test_catches_a_broken_mechanism(tiny_model_dir, break_with):
    r = distill_run(tiny_model_dir, break_with)
    assert not distillation_works(r), (break_with, r)
