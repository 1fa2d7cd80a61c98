"""Policies that travel: every published policy folder carries a model card (README.md, Hugging Face format)
read back here, and `hdpo export` writes a folder that transformers loads as is, in bf16 when the config trains
in bf16, with the benchmark numbers of its evaluations in the card."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_problems
from hdpo.cli import main
from hdpo.config import load_config
from hdpo.evaluate import evaluate_checkpoint, model_digest
from hdpo.io import write_jsonl
from hdpo.model_card import config_digest, read_front_matter
from test_train import _data, _run


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    data = _data(tmp, {"7", "8"})
    write_jsonl(data / "benchmarks" / "toy.jsonl", [p.to_dict() for p in tiny_problems()[:3]])
    return _run(tmp, tiny_model_dir, "grpo_seed1", data, **{"hdpo.distill_weight": 0.0}), data


def test_each_published_policy_has_a_model_card(trained):
    trainer, _ = trained
    run = trainer.run_dir
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(run / "config.yaml")
    for which in ("policy_final", "policy_best"):
        card = run / which / "README.md"
        front = read_front_matter(card)
        meta = json.loads((run / which / "hdpo_meta.json").read_text())
        assert front["base_model"] == cfg.model.name and front["library_name"] == "transformers"
        (result,) = front["model-index"][0]["results"]
        assert result["dataset"]["name"] == "validation"
        values = {m["type"]: m["value"] for m in result["metrics"]}
        if which == "policy_final":  # the validation of the final step, as in summary.json
            assert values["pass@1"] == pytest.approx(summary["final"]["pass@1"], abs=1e-4)
            assert values["greedy_acc"] == pytest.approx(summary["final"]["greedy_acc"], abs=1e-4)
        text = card.read_text()
        for fact in (f"| method | {cfg.run.method} |", "| lambda (hdpo.distill_weight) | 0.0 |",
                     "| teacher | none (GRPO) |", f"| seed | {cfg.seed} |",
                     f"| training step of these weights | {meta['model_step']} |",
                     f"| training steps of the run | {cfg.grpo.max_num_steps} |",
                     f"| config digest | {config_digest(cfg)} |"):
            assert fact in text, fact
    # the card is a label: the best/final reuse of evaluations still sees the same model files
    copy = run.parent / "copy"
    shutil.copytree(run / "policy_final", copy)
    (copy / "README.md").write_text("another card")
    assert model_digest(copy) == model_digest(run / "policy_final")


def test_config_digest_ignores_what_changes_no_result(trained):
    cfg = load_config(trained[0].run_dir / "config.yaml")
    same = load_config(trained[0].run_dir / "config.yaml", ["generation.batch_size=3", "tracking.backends=[wandb]"])
    other = load_config(trained[0].run_dir / "config.yaml", ["optimizer.lr=0.5"])
    assert config_digest(cfg) == config_digest(same) != config_digest(other)


def test_export_writes_a_bf16_folder_transformers_loads_with_benchmarks_in_its_card(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, data = trained
    run = trainer.run_dir
    result = tmp_path / "eval" / "toy.json"
    evaluate_checkpoint(load_config(run / "config.yaml"), run / "policy_best", "toy", data, result)
    out = tmp_path / "export"
    main(["export", "--config", str(run / "config.yaml"), "--set", "model.dtype=bfloat16",
          "--model", str(run / "policy_best"), "--out", str(out), "--results", str(result)])
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")  # as a user (or vLLM) loads it
    assert model.dtype == torch.bfloat16
    master = AutoModelForCausalLM.from_pretrained(run / "policy_best", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is the magic number?", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = master(ids).logits, model(ids).logits.float()
    assert torch.allclose(a, b, atol=0.1 * a.abs().max().item())  # the same network, rounded to bf16
    front = read_front_matter(out / "README.md")
    names = [r["dataset"]["name"] for r in front["model-index"][0]["results"]]
    assert names == ["validation", "toy"]
    toy = {m["type"]: m["value"] for m in front["model-index"][0]["results"][1]["metrics"]}
    assert toy["pass@1"] == pytest.approx(json.loads(result.read_text())["pass@1"], abs=1e-4)
    assert json.loads((out / "hdpo_meta.json").read_text())["checkpoint"] == "best"
