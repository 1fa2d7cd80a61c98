"""The CLI's honest failures: the paper's config on a machine without a GPU or without the Hub stops at once
and points to the CPU demo config; bad config values name the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER = str(REPO / "config" / "config.yaml")


def hdpo(*args, env=None):
    return subprocess.run([sys.executable, "-m", "hdpo", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_paper_config_without_gpu_points_to_demo(tmp_path):
    proc = hdpo("train", "--config", PAPER, "--method", "grpo", "--data", str(tmp_path), "--run-dir",
                str(tmp_path / "run"), "--work-dir", str(tmp_path / "work"))
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr and "config/demo.yaml" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_paper_config_without_hub_points_to_demo(tmp_path):
    from hdpo.data import _check_hub

    try:
        _check_hub("probe")
    except ConnectionError:
        pass
    else:
        pytest.skip("the Hugging Face Hub is reachable from here")
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    proc = hdpo("prepare-data", "--config", PAPER, "--out", str(tmp_path / "data"), env=env)
    assert proc.returncode != 0 and "not reachable" in proc.stderr and "config/demo.yaml" in proc.stderr
    assert not (tmp_path / "data" / "train.jsonl").exists()


@pytest.mark.parametrize("override, key", [("grpo.num_generations_per_prompt=1", "grpo.num_generations_per_prompt"),
                                           ("hdpo.teacher=teacherless", "hdpo.teacher"),
                                           ("grpo.typo_key=3", "grpo.typo_key")])
def test_bad_config_value_names_the_key(tmp_path, override, key):
    proc = hdpo("prepare-data", "--config", str(REPO / "config" / "demo.yaml"), "--set", override,
                "--out", str(tmp_path))
    assert proc.returncode != 0 and key in proc.stderr and "Traceback" not in proc.stderr
