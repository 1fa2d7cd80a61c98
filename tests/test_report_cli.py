"""The report and evaluation CLI as a user runs it (subprocesses): tables from result files, and the base-model
evaluation's argument check."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

import synthetic_results as syn

REPO = Path(__file__).resolve().parents[1]


def hdpo(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "hdpo", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_report_tables_from_the_command_line(tmp_path):
    cfg = syn.config(methods=["grpo", "hdpo_drifting_lambda0.1"], seeds=[1, 2])
    syn.write_all(tmp_path / "results", cfg, n_problems=30, bench_problems=8)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = hdpo("report", "tables", "--config", str(config), "--results", str(tmp_path / "results"), "--out",
                str(tmp_path / "tables"))
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "tables" / "differences.md").read_text()
    assert "HDPO drifting, λ=0.1" in text and "p=" in text


def test_evaluate_needs_exactly_one_of_model_and_base(tmp_path):
    demo = str(REPO / "config" / "demo.yaml")
    for extra in ([], ["--model", str(tmp_path), "--base"]):
        proc = hdpo("evaluate", "--config", demo, "--benchmark", "math500", "--data", str(tmp_path), "--out",
                    str(tmp_path / "x.json"), *extra)
        assert proc.returncode != 0 and "exactly one of --model DIR and --base" in proc.stderr
