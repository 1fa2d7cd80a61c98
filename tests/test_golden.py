"""Golden runs: tiny fixed trainings (GRPO and three HDPO set-ups, 3 steps each) whose metrics (without timings),
cliff ledger and final weights were recorded before the training step was refactored into phases. A refactor
must not change a bit of them.

Bit-for-bit holds only where the arithmetic is the same: the recording names its machine (torch, transformers,
CPU capability and model, thread count). There every float and the sha256 of the final weights must match
exactly; elsewhere (another CPU's float32 kernels) counts must match exactly and floats to 1e-4, per-parameter
sums of the weights included.

Record again (after a change that is meant to change the numbers): HDPO_GOLDEN_RECORD=1 pytest tests/test_golden.py
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from pathlib import Path

import pytest
import torch
import transformers

from conftest import tiny_config
from hdpo.io import read_jsonl
from hdpo.train import train
from test_train import _data

GOLDEN = Path(__file__).parent / "golden" / "train_runs.json"

# name -> config overrides; together they take every path of the step: GRPO, the overlapped privileged rollouts
# (drifting teacher), the frozen teacher sampling its own privileged rollouts after the rollouts under a cliff cap,
# and the speculative start with a token budget, packing, small chunks and the sampler correction.
RUNS = {
    "grpo": {"hdpo.distill_weight": 0.0},
    "hdpo_drifting": {},
    "hdpo_frozen_teacher_sampler": {"hdpo.teacher": "frozen", "hdpo.privileged_sampler": "teacher",
                                    "hdpo.max_cliff_prompts_per_step": 1},
    "hdpo_speculative_packed": {"hdpo.privileged_start": "speculative", "grpo.micro_batch_tokens": 96,
                                "grpo.sequence_packing": True, "grpo.logprob_chunk_size": 7,
                                "grpo.sampler_correction": "token"},
}


def fingerprint() -> dict:
    cpu = ""
    if Path("/proc/cpuinfo").exists():
        cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                    if l.startswith("model name")), "")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


def weights_digest(folder: Path) -> tuple[str, dict]:
    """sha256 over every tensor of the saved policy (name, dtype, shape, bytes) and each tensor's float64 sum."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    h = hashlib.sha256()
    sums = {}
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        sums[name] = float(t.double().sum())
    return h.hexdigest(), sums


def run_golden(model_dir: Path, tmp_path: Path, name: str) -> dict:
    overrides = {"grpo.max_num_steps": 3, "eval.val_period": 3, "grpo.num_prompts_per_step": 3,
                 **RUNS[name]}
    cfg = tiny_config(model_dir, **overrides)
    run_dir = tmp_path / "runs" / name
    # every toy problem (answers 8, 8, 7, 8, 7, 8): cliffs and solved prompts side by side
    train(cfg, _data(tmp_path, {"7", "8"}), run_dir, tmp_path / "work" / name, tmp_path / "models", resume=False)
    metrics = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(run_dir / "metrics.jsonl")]
    sha, sums = weights_digest(run_dir / "policy_final")
    return {"metrics": metrics, "ledger": read_jsonl(run_dir / "cliffs.jsonl"), "weights_sha256": sha,
            "weight_sums": sums}


def _close(got, want, path: str) -> None:
    """Counts and strings exactly, floats to 1e-4 (relative, or absolute near zero)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6), \
            f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", list(RUNS))
def test_training_matches_the_recorded_golden_run(tiny_model_dir, tmp_path, name):
    got = run_golden(tiny_model_dir, tmp_path, name)
    if os.environ.get("HDPO_GOLDEN_RECORD"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden["fingerprint"] = fingerprint()
        golden.setdefault("runs", {})[name] = got
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {name} into {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    want = golden["runs"][name]
    # the run must exercise what it is named for
    train_rows = [r for r in got["metrics"] if r["kind"] == "train"]
    assert len(train_rows) == 3 and sum(r["cliffs"] for r in train_rows) > 0
    if name != "grpo":
        assert sum(r["privileged/kept"] for r in train_rows) > 0
    if golden["fingerprint"] == fingerprint():
        assert got["metrics"] == want["metrics"]
        assert got["ledger"] == want["ledger"]
        assert got["weights_sha256"] == want["weights_sha256"], "the final weights differ from the golden run's"
    else:
        _close(got, {k: v for k, v in want.items() if k != "weights_sha256"} | {"weights_sha256": got["weights_sha256"]},
               name)
