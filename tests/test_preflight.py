"""`hdpo preflight` end to end at the tiny shape (the real CLI in a subprocess, the paper's config), and its
kill/resume check catching a resume that does not continue the trajectory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    for row in ("kill + resume", "update micro-batch", "checkpoint write", "generation (bf16_copy)", "verdict"):
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
