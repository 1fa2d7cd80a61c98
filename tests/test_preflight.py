"""`hdpo preflight` end to end at the tiny shape (the real CLI in a subprocess, the paper's config), and its
kill/resume check catching a resume that does not continue the trajectory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hdpo.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_preflight_cli_on_the_paper_config_at_tiny_shape(tmp_path):
    out = tmp_path / "verdict.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hdpo", "preflight", "--config", str(REPO / "config" / "config.yaml"),
                           "--out", str(out), "--gen-baseline"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    v = json.loads(out.read_text())
    assert v["tiny"] and v["fits"]
    assert v["resume"]["ok"] and v["resume"]["killed_by_sigkill"] and v["resume"]["max_weight_diff"] == 0.0
    assert v["resume"]["tokens"]["tokens/grpo"] > 0 and v["resume"]["tokens"]["tokens/distill"] > 0
    assert v["model"]["shape"].startswith("built-in Qwen2.5-Math-1.5B")  # no Hub: the built-in shape
    u = v["update"]
    assert u["ok"] and u["sequences"] >= 1 and u["sequences"] * (u["prompt_tokens"] + u["response_tokens"]) <= 1024
    assert v["checkpoint"]["gib"] > 0 and v["checkpoint"]["seconds"] > 0
    assert set(v["generation"]) == {"bf16_copy", "hf_generate", "fp32_autocast"}
    assert all(g["generated"] > 0 and g["tokens_per_s"] > 0 for g in v["generation"].values())
    assert v["estimate"]["hours"] > 0 and v["estimate"]["steps"] == 2000
    assert v["estimate"]["hdpo_hours_max"] > v["estimate"]["hours"]  # the paper grid has HDPO methods
    for row in ("kill + resume", "update micro-batch", "checkpoint write", "generation (bf16_copy)",
                "estimated HDPO run", "verdict"):
        assert row in proc.stdout
    assert not list((tmp_path / "work" / "ckpt").glob("*.pt"))  # the timed checkpoint is removed


def test_resume_check_catches_a_resume_that_loses_the_optimizer_state(tmp_path, monkeypatch):
    from hdpo import preflight
    from hdpo.train import Trainer

    cfg = load_config(REPO / "config" / "config.yaml", ["model.dtype=float32"])
    original = Trainer.load_checkpoint

    def forgetful(self):
        ok = original(self)
        self.optimizer.state.clear()  # a resume that restores the weights but not AdamW's moments
        return ok

    monkeypatch.setattr(Trainer, "load_checkpoint", forgetful)
    r = preflight.check_resume(cfg, tmp_path)
    assert r["killed_by_sigkill"] and not r["ok"] and r["max_weight_diff"] > 0


def test_run_estimate_by_hand():
    """The paper config (32 x 16 rollouts on 8 GPUs, 4096-token sequences: 2048 new tokens assumed, 2000
    steps) at round measured rates: 10,000 generated tokens/s; an update micro-batch of 4 x 2048 response
    tokens in 2 s (4096 tokens/s)."""
    from hdpo.preflight import estimate_hours

    cfg = load_config(REPO / "config" / "config.yaml")
    e = estimate_hours(cfg, {"ok": True, "sequences": 4, "response_tokens": 2048, "seconds": 2.0},
                       {"tokens_per_s": 10_000.0})
    seqs, new = 32 * 16 / 8, 2048  # per GPU
    assert e["gpus"] == 8 and e["response_tokens_assumed"] == new
    assert e["generation_s"] == seqs * new / 10_000 and e["update_s"] == seqs * new / 4096
    assert e["hours"] == (seqs * new / 10_000 + seqs * new / 4096) * 2000 / 3600
    # HDPO at most: all 32 prompts cliffs, 16 privileged rollouts each, sampled, teacher-scored and distilled
    priv = 32 * 16 / 8
    want = e["seconds_per_step"] + priv * new / 10_000 + priv * new / 4096 * 4 / 3
    assert e["hdpo_seconds_per_step_max"] == pytest.approx(want, rel=1e-12)
    assert e["hdpo_hours_max"] == pytest.approx(want * 2000 / 3600, rel=1e-12)
