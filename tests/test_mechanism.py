"""The mechanism experiment (hdpo.synthetic, hdpo.mechanism, config/mechanism.yaml, `snakemake mechanism`):
generated problems are real sums that math-verify checks, the measurements equal a brute-force forward pass, the
outcome table equals the paired means it claims, and the target plans its own jobs only."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, tiny_problems
from hdpo.config import SYSTEM_PROMPT, ConfigError, DatasetSpec, from_dict, load_config
from hdpo.data import DataError, build_messages, load_problems, render_prompt
from hdpo.losses import topk_jsd
from hdpo.mechanism import cliff_sets, outcomes, per_problem, reference_scores
from hdpo.reward import score_one
from hdpo.stats import paired_difference
from hdpo.synthetic import generate
from hdpo.update import MicroBatching


# --- generated problems ------------------------------------------------------------------------------------------

def test_generated_sums_are_correct_and_checked_by_math_verify():
    rows = generate("addition3", 60, 2026)
    assert rows == generate("addition3", 60, 2026)  # a function of (name, seed, index)
    assert rows[:5] == generate("addition3", 5, 2026)  # a longer pool extends a shorter one
    assert rows != generate("addition3", 60, 2027)
    for row in rows:
        a, b = map(int, re.fullmatch(r"Add (\d{3}) and (\d{3})\.", row["problem"]).groups())
        assert row["answer"] == str(a + b)
        assert score_one(row["solution"], row["answer"])[0] == 1.0
        # math-verify evaluates an unboxed expression: the problem text must not hold one that equals the answer
        assert score_one(row["problem"], row["answer"])[0] == 0.0
    assert len({r["id"] for r in rows}) == 60


def test_generated_source_loads_like_any_dataset():
    problems = load_problems(DatasetSpec(generator="addition4", limit=3, generator_seed=1, id_key="id"), name="gen")
    assert [p.id for p in problems] == ["gen:add4-1-0", "gen:add4-1-1", "gen:add4-1-2"]
    assert all(p.solution and p.answer and 1000 <= int(p.answer) // 2 for p in problems)


@pytest.mark.parametrize("spec, key", [({"generator": "subtraction9", "limit": 4}, "data.train[0].generator"),
                                       ({"generator": "addition3"}, "data.train[0].limit")])
def test_bad_generator_settings_name_the_key(spec, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        from_dict({"data": {"train": [spec]}})


def test_generator_without_limit_is_a_data_error_outside_the_config():
    with pytest.raises(DataError, match="needs `limit`"):
        load_problems(DatasetSpec(generator="addition3"))


# --- the measurements against a brute-force forward pass ---------------------------------------------------------

@pytest.mark.parametrize("pack", [False, True])
def test_reference_scores_equal_a_full_forward(tiny_model_dir, pack):
    """Per response: the mean plain-prompt log-prob of its tokens and the mean top-k JSD to the same model on the
    privileged prompt, from one full [T, V] forward each (float64, so any CPU agrees to 1e-10), padded or packed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain, priv, responses = [], [], []
    for i, p in enumerate(tiny_problems()[:3]):
        plain.append(tok(render_prompt(tok, build_messages(p, SYSTEM_PROMPT)), add_special_tokens=False).input_ids)
        priv.append(tok(render_prompt(tok, build_messages(p, SYSTEM_PROMPT, "answer")),
                        add_special_tokens=False).input_ids)
        responses.append(tok(f"The answer is \\boxed{{{7 + i}}}", add_special_tokens=False).input_ids)
    k = 8
    micro = MicroBatching(2, pack=pack, chunk=3, pad_id=tok.pad_token_id)
    logp, jsd = reference_scores(model, micro, plain, priv, responses, k, temperature=1.0)
    for j, (pl, pr, r) in enumerate(zip(plain, priv, responses)):
        with torch.no_grad():
            student = torch.log_softmax(model(torch.tensor([pl + r])).logits[0, len(pl) - 1:-1], -1)
            teacher = torch.log_softmax(model(torch.tensor([pr + r])).logits[0, len(pr) - 1:-1], -1)
        want_lp = student.gather(-1, torch.tensor(r)[:, None]).mean()
        vals, ids = teacher.topk(k, -1)
        want_jsd = topk_jsd(vals, student.gather(-1, ids)).mean()
        assert logp[j] == pytest.approx(float(want_lp), abs=1e-10)
        assert jsd[j] == pytest.approx(float(want_jsd), abs=1e-10)
        assert 0.0 <= jsd[j] <= math.log(2)


# --- the analysis: ledgers and measurements -> outcomes ------------------------------------------------------------

def _ledger(rows):  # (step, id, cliff, distilled)
    return [{"step": s, "id": i, "cliff": c, "distilled": d} for s, i, c, d in rows]


def _synthetic():
    ids = ["p0", "p1", "p2", "p3"]
    ledgers = {  # p0, p1: distilled by HDPO in both seeds; p2: distilled in seed 1 only; p3: never a cliff
        ("hdpo", 1): _ledger([(1, "p0", True, True), (1, "p1", True, True), (2, "p2", True, True),
                              (2, "p3", False, False), (3, "p0", True, True)]),
        ("hdpo", 2): _ledger([(1, "p0", True, True), (2, "p1", True, True), (2, "p2", True, False),
                              (3, "p3", False, False)]),
        ("grpo", 1): _ledger([(1, "p0", True, False), (1, "p1", True, False), (2, "p3", False, False)]),
        ("grpo", 2): _ledger([(1, "p2", True, False), (2, "p3", False, False)]),
    }
    rng = np.random.default_rng(0)

    def measure():
        return {i: {"id": i, "solved": int(rng.integers(0, 9)), "samples": 8, "references": 2,
                    "ref_logprob": float(rng.normal(-2, 0.5)), "ref_jsd": float(rng.uniform(0, 0.3))} for i in ids}

    measures = {"base": measure(), **{f"{m}_seed{s}": measure() for m in ("grpo", "hdpo") for s in (1, 2)}}
    for run in measures:  # a problem without reference responses has none at any checkpoint
        measures[run]["p1"].update(references=0, ref_logprob=None, ref_jsd=None)
    return ids, ledgers, measures


def test_cliff_sets():
    ids, ledgers, _ = _synthetic()
    assert cliff_sets(ids, ledgers, "hdpo", [1, 2]) == (["p0", "p1"], ["p3"])


def test_outcomes_equal_the_paired_means_they_claim():
    ids, ledgers, measures = _synthetic()
    rows = per_problem(ids, ledgers, measures, ["grpo", "hdpo"], [1, 2], "hdpo")
    assert len(rows) == 2 * 2 * 4
    first = {(r["method"], r["seed"], r["id"]): r["first_distilled_step"] for r in rows}
    assert first[("hdpo", 1, "p0")] == 1 and first[("hdpo", 2, "p1")] == 2 and first[("grpo", 1, "p0")] is None
    out = {r["outcome"]: r for r in outcomes(rows, "grpo", "hdpo", [1, 2])}

    def final(run, pid, key):
        return measures[run][pid][key]

    # (b): solve rate on the distilled cliffs p0, p1, paired by seed and problem
    h = np.array([[final(f"hdpo_seed{s}", i, "solved") / 8 for i in ("p0", "p1")] for s in (1, 2)])
    g = np.array([[final(f"grpo_seed{s}", i, "solved") / 8 for i in ("p0", "p1")] for s in (1, 2)])
    want = paired_difference(h, g)
    assert out["b_solve"]["problems"] == 2 and out["b_solve"]["diff"] == pytest.approx((h - g).mean())
    assert (out["b_solve"]["diff_low"], out["b_solve"]["diff_high"]) == pytest.approx((want.low, want.high))
    assert out["b_solve"]["base"] == pytest.approx(np.mean([final("base", i, "solved") / 8 for i in ("p0", "p1")]))
    # (a): only p0 has reference responses; the change from the untrained model
    assert out["a_logprob"]["problems"] == 1
    dh = [final(f"hdpo_seed{s}", "p0", "ref_logprob") - final("base", "p0", "ref_logprob") for s in (1, 2)]
    dg = [final(f"grpo_seed{s}", "p0", "ref_logprob") - final("base", "p0", "ref_logprob") for s in (1, 2)]
    assert out["a_logprob"]["hdpo"] == pytest.approx(np.mean(dh))
    assert out["a_logprob"]["diff"] == pytest.approx(np.mean(dh) - np.mean(dg))
    # (c): p3 alone was never a cliff
    assert out["c_solve"]["problems"] == 1


def test_an_empty_set_says_so_instead_of_a_number():
    ids, ledgers, measures = _synthetic()
    for key in list(ledgers):  # every problem a cliff somewhere: no never-cliff problems
        ledgers[key] = [dict(r, cliff=True) for r in ledgers[key]]
    rows = per_problem(ids, ledgers, measures, ["grpo", "hdpo"], [1, 2], "hdpo")
    c = next(r for r in outcomes(rows, "grpo", "hdpo", [1, 2]) if r["outcome"] == "c_solve")
    assert c["problems"] == 0 and "diff" not in c


# --- the config and the target -------------------------------------------------------------------------------------

def test_mechanism_config_is_valid_and_has_one_control():
    cfg = load_config(REPO / "config" / "mechanism.yaml")
    weights = sorted(m.distill_weight for m in cfg.experiment.methods.values())
    assert weights[0] == 0.0 and weights[1] > 0 and len(weights) == 2
    assert cfg.data.train[0].generator and len(cfg.experiment.seeds) >= 2


def test_mechanism_target_plans_its_own_jobs_only(tmp_path):
    from test_workflow import job_counts, snakemake

    out = snakemake(tmp_path, "-n", "--cores", "2", "mechanism")  # the paper's config: no GPU asked for here
    seeds = len(load_config(REPO / "config" / "mechanism.yaml").experiment.seeds)
    assert job_counts(out) == {"mechanism_data": 1, "mechanism_reference": 1, "mechanism_train": 2 * seeds,
                               "mechanism_measure": 2 * seeds, "mechanism_measure_base": 1, "mechanism": 1}
    assert "results/runs/" not in out.replace("results/mechanism/runs/", "")


def test_report_writes_the_table_and_figure_from_files(tmp_path):
    """`hdpo mechanism report`'s writer on files laid out as the workflow writes them."""
    from hdpo.io import write_jsonl
    from hdpo.report.mechanism import write

    cfg = load_config(REPO / "config" / "mechanism.yaml")
    cfg.experiment.seeds = [1, 2]
    ids, ledgers, measures = _synthetic()
    root = tmp_path / "mechanism"
    write_jsonl(root / "data" / "train.jsonl", [{"id": i} for i in ids])
    write_jsonl(root / "reference.jsonl", [{"id": i, "drawn": 16, "correct": 3 if i != "p1" else 0} for i in ids])
    for (method, seed), rows in ledgers.items():
        write_jsonl(root / "runs" / f"{method}_seed{seed}" / "cliffs.jsonl", rows)
        write_jsonl(root / "runs" / f"{method}_seed{seed}" / "metrics.jsonl",
                    [{"kind": "train", "step": s, "reward/mean": 0.1 * s, "loss/jsd": 0.1} for s in (1, 2, 3)])
    for run, rows in measures.items():
        write_jsonl(root / "measure" / f"{run}.jsonl", rows.values())
    paths = write(cfg, root, tmp_path / "figures")
    assert [p.name for p in paths] == ["outcomes.csv", "outcomes.md", "per_problem.csv", "mechanism.png",
                                       "mechanism.pdf"]
    md = (root / "outcomes.md").read_text()
    solved = sum(measures["base"][i]["solved"] for i in ids)
    assert f"plain-prompt pass rate {solved / 32:.3f} ({solved} of 32 samples)" in md
    assert "privileged-prompt pass rate 0.141 (9 of 64)" in md
    assert md.count("| b_solve |") == 1 and (tmp_path / "figures" / "mechanism.png").stat().st_size > 10_000
