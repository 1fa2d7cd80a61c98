"""One pin per dependency: pyproject.toml, environment.yml and the jobs' conda env (workflow/envs/hdpo.yaml)
give every shared package the same version specifier, and both environments hold every runtime dependency."""
from __future__ import annotations

import os
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _split(req: str) -> tuple[str, str]:
    """'math-verify[antlr4_13_2]>=0.9' -> ('math-verify', '[antlr4_13_2]>=0.9'): the name and the rest."""
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(.*?)\s*(#.*)?$", req)
    assert m, req
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return dict(_split(r) for r in project["dependencies"])


def _conda(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    out = {}
    for dep in env["dependencies"]:
        for req in dep["pip"] if isinstance(dep, dict) else []:
            if not req.startswith("-"):  # `-e .` installs the project itself
                name, spec = _split(req)
                out[name] = spec
    return out


def test_one_pin_per_dependency():
    files = {"pyproject.toml": _pyproject(), "environment.yml": _conda(REPO / "environment.yml"),
             "workflow/envs/hdpo.yaml": _conda(REPO / "workflow" / "envs" / "hdpo.yaml")}
    names = set().union(*files.values())
    for name in sorted(names):
        specs = {f: deps[name] for f, deps in files.items() if name in deps}
        assert len(set(specs.values())) == 1, f"{name} is pinned differently: {specs}"
    runtime = set(files["pyproject.toml"])
    assert runtime <= set(files["environment.yml"])
    assert runtime - {"snakemake"} <= set(files["workflow/envs/hdpo.yaml"])  # jobs need no Snakemake


def test_the_comparison_can_fail(tmp_path):
    env = tmp_path / "env.yaml"
    env.write_text("dependencies:\n  - pip:\n      - math-verify[antlr4_13_2]>=0.7\n")
    assert _conda(env)["math-verify"] != _pyproject()["math-verify"]


def _train_command(tmp_path, *extra: str) -> str:
    from test_workflow import snakemake

    out = snakemake(tmp_path, "grpo", "-n", "-p", "--cores", "1", *extra, "--configfile",
                    str(REPO / "config" / "demo.yaml"))
    commands = re.findall(r"^\s*(?:Shell command: )?(.*-m hdpo train .*)$", out, flags=re.M)
    assert len(commands) == 1, out[-2000:]
    return commands[0]


def test_jobs_import_the_workflows_hdpo_with_the_snakemake_interpreter(tmp_path):
    import shlex
    import sys

    cmd = _train_command(tmp_path)
    assert cmd.startswith(f"PYTHONPATH={shlex.quote(str(REPO))}")
    words = shlex.split(cmd)
    interpreter = words[words.index("-m") - 1]
    # the same file, not the same string: a venv's bin/python and bin/python3 are one interpreter
    assert os.path.samefile(interpreter, sys.executable), (interpreter, sys.executable)


@pytest.mark.skipif(shutil.which("conda") is None and shutil.which("mamba") is None,
                    reason="conda is not installed on this machine")
def test_under_sdm_conda_jobs_run_the_envs_python(tmp_path):
    import sys

    cmd = _train_command(tmp_path, "--sdm", "conda")
    assert " python -m hdpo train" in cmd and sys.executable not in cmd
