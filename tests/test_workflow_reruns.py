"""One invocation builds what was asked, and reruns exactly what the workflow README's rerun table says.

On a finished tiny DAG (the real pipeline, through the real `snakemake`):
1. every row of the table in workflow/README.md ("When does a job rerun?") is applied as written in its "e.g."
   column, and the dry-run of the whole DAG plans exactly the rules of its "reruns" column;
2. for each kind of change and each kind of target, the target's plan is exactly its share of the whole DAG's
   plan (the jobs it needs), and a target whose output was moved away is always planned (snakemake#4166 made
   Snakemake drop it when an `ancient()` input's job reran);
3. one real invocation per change builds its target, runs exactly the planned jobs, and leaves the target
   present and up to date.
"""
from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from hdpo.config import paper_methods
from tests.test_workflow import REPO, _tiny, snakemake, write_config

README = REPO / "workflow" / "README.md"
RULES = {"prepare_data", "prepare_benchmark", "train", "evaluate", "evaluate_base", "tables", "figures"}

# The kinds of target and, for those that are files, the file moved away to make it missing.
TARGETS = {
    "grpo": None,  # a method target: its runs and their evaluations
    "results/eval/grpo_seed1/final/math500.json": "results/eval/grpo_seed1/final/math500.json",
    "results/eval/base/math500.json": "results/eval/base/math500.json",
    "tables": "results/tables/table1.csv",
    "figures": "figures/val_passk.png",
    "all": None,
}
PRODUCER = {"results/eval/grpo_seed1/final/math500.json": "evaluate", "results/eval/base/math500.json": "evaluate_base",
            "tables": "tables", "figures": "figures"}
# The kinds of change, each a row of the README's table (by the start of its "change" cell).
CHANGES = ("a data setting", "a benchmark added", "a benchmark's settings", "a training setting",
           "a model, generation or evaluation setting", "a method added")


# --- the README's table ------------------------------------------------------------------------------------------

def readme_rows() -> list[dict]:
    text = README.read_text()
    section = text[text.index("## When does a job rerun?"):]
    section = section[:section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("change", "---"):
            continue
        change, example, reruns = cells
        named = re.findall(r"`([^`]+)`", re.sub(r"\(.*\)", "", reruns))  # notes in parentheses aside
        assert set(named) <= RULES, f"README rerun table, row {change!r}: not rules: {set(named) - RULES}"
        assert named or reruns.startswith("nothing"), f"README rerun table, row {change!r}: no rule, not 'nothing'"
        rows.append({"change": change, "example": example, "reruns": set(named)})
    assert len(rows) >= 15, "the README's rerun table was not found"
    return rows


def row(kind: str) -> dict:
    found = [r for r in readme_rows() if r["change"].startswith(kind)]
    assert len(found) == 1, kind
    return found[0]


class Applied:
    """A row's example applied to the tiny DAG: a config file and command-line options, plus file edits that
    `restore()` undoes (Snakemake compares checksums, so the restored file is unchanged)."""

    def __init__(self, root: Path, example: str, cfg: dict | None = None):
        self.root, self.extra, self.edited = root, [], {}
        cfg = _tiny() if cfg is None else cfg
        m = re.fullmatch(r"`([\w.]+) \+= (\S+)`", example)
        m2 = re.fullmatch(r"`([\w.]+): (.+)`", example)
        if m:
            key, value = m.groups()
            if key == "experiment.methods":
                cfg["experiment"]["methods"] = {**cfg["experiment"]["methods"], **paper_methods(value)}
            else:
                _at(cfg, key).append(yaml.safe_load(value))
        elif m2:
            key, value = m2.groups()
            *parents, last = key.split(".")
            _container(cfg, parents)[last] = yaml.safe_load(value)
        elif example.startswith("`--"):
            self.extra = example.strip("`").split()
        elif m := re.fullmatch(r"edit `([\w/.]+)`", example):
            self._edit(root / m.group(1), lambda s: s + "\n# edited\n")
        elif m := re.fullmatch(r"edit the shell of rule `(\w+)`", example):
            name = m.group(1)
            smk = next(p for p in (root / "workflow" / "rules").glob("*.smk") if f"rule {name}:" in p.read_text())
            self._edit(smk, lambda s: re.sub(rf"(rule {name}:.*?shell:\n\s+\"[^\"]*)\"", r'\1 "', s, count=1,
                                             flags=re.S))
        else:
            raise AssertionError(f"README rerun table: an example the test cannot apply: {example}")
        self.config = write_config(root / "change.yaml", cfg)

    def _edit(self, path: Path, change) -> None:
        old = path.read_text()
        new = change(old)
        assert new != old, path
        self.edited[path] = old
        path.write_text(new)

    def restore(self) -> None:
        for path, old in self.edited.items():
            path.write_text(old)


def _at(cfg: dict, key: str):
    *parents, last = key.split(".")
    return _container(cfg, parents)[last]


def _container(cfg: dict, parents: list[str]) -> dict:
    node = cfg
    i = 0
    while i < len(parents):  # method names hold dots: take the longest key present
        for j in range(len(parents), i, -1):
            name = ".".join(parents[i:j])
            if name in node:
                node, i = node[name], j
                break
        else:
            node = node.setdefault(parents[i], {})
            i += 1
    return node


# --- plans: the jobs a dry-run (or a run) lists ------------------------------------------------------------------

def jobs(out: str) -> set[tuple[str, str]]:
    """(rule, first output) of every job block with outputs; target rules (no outputs) are left out."""
    found, rule = set(), None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\S+):$", line.strip())
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("output: "):
            found.add((rule, line.strip()[len("output: "):].split(", ")[0]))
            rule = None
        elif not line.strip():
            rule = None
    return found


def plan(root: Path, applied: Applied, *targets: str, force: bool = False) -> set[tuple[str, str]]:
    args = ["-n", "--nolock", "--cores", "2", *(["-F"] if force else []), *applied.extra, *targets,
            "--configfile", str(applied.config)]
    return jobs(snakemake(root, *args, snakefile=root / "workflow" / "Snakefile"))


def rules_of(planned: set) -> set[str]:
    return {r for r, _ in planned}


def producer(needed: set, target: str) -> tuple[str, str]:
    """The job that writes a file target: in the target's forced plan, the one job of its rule."""
    (job,) = [j for j in needed if j[0] == PRODUCER[target]]
    return job


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, data_dir):
    """The tiny DAG, run to the end once for the whole module."""
    root = tmp_path_factory.mktemp("reruns") / "repo"
    shutil.copytree(REPO / "workflow", root / "workflow")
    shutil.copytree(REPO / "hdpo", root / "hdpo", ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HDPO_TINY_MODEL", str(tiny_model_dir))
        mp.setenv("HDPO_DATA_DIR", str(data_dir))
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        base = write_config(root / "tiny.yaml", _tiny())
        snakemake(root, "--cores", "2", "--configfile", str(base), snakefile=root / "workflow" / "Snakefile")
        yield root


def test_every_row_of_the_readme_table_reruns_what_it_says(built):
    assert plan(built, Applied(built, "`--config seed=1`")) == set()  # a finished DAG
    for r in readme_rows():
        applied = Applied(built, r["example"])
        try:
            got = rules_of(plan(built, applied))
        finally:
            applied.restore()
        assert got == r["reruns"], f"README rerun table, row {r['change']!r} ({r['example']}): plans {sorted(got)}"
    # an hdpo.* key spares GRPO (the row's note)
    applied = Applied(built, "`hdpo.topk_logits_k: 8`")
    assert {j for j in plan(built, applied) if j[0] == "train"} == {
        ("train", "results/runs/hdpo_frozen_lambda0.1_seed1/metrics.jsonl")}


@pytest.mark.parametrize("kind", CHANGES)
def test_each_target_plans_exactly_its_share(built, kind):
    """For this change and every kind of target: the target's plan is the whole DAG's plan restricted to the jobs
    the target needs; moved away, the target's own job joins it, whatever else reruns."""
    applied = Applied(built, row(kind)["example"])
    with ThreadPoolExecutor(2) as pool:  # dry-runs only read the finished DAG: two at a time (--nolock)
        whole = pool.submit(plan, built, applied)
        needs = {t: pool.submit(plan, built, applied, t, force=True) for t in TARGETS}
        plans = {t: pool.submit(plan, built, applied, t) for t in TARGETS}
        whole = whole.result()
    for target, moved in TARGETS.items():
        needed = needs[target].result()
        assert plans[target].result() == whole & needed, (kind, target)
        if moved is None:
            continue
        path = built / moved
        aside = path.with_name(path.name + ".aside")
        path.rename(aside)
        try:
            got = plan(built, applied, target)
        finally:
            aside.rename(path)
        assert got == (whole & needed) | {producer(needed, target)}, (kind, target, got)


def test_one_invocation_builds_the_target(built):
    """One real run per change (the changes accumulate), each for another kind of target, moved away first
    where it is a file: exit 0, exactly the planned jobs, and the target present and up to date."""
    cfg = _tiny()
    pairs = [("a benchmark's settings", "results/eval/base/math500.json"),  # the case reported in issue 28
             ("a benchmark added", "results/eval/grpo_seed1/final/math500.json"),
             ("a model, generation or evaluation setting", "grpo"),
             ("a training setting", "tables"),
             ("a data setting", "figures"),
             ("a method added", "all")]
    assert {c for c, _ in pairs} == set(CHANGES) and {t for _, t in pairs} == set(TARGETS)
    sf = built / "workflow" / "Snakefile"
    for kind, target in pairs:
        applied = Applied(built, row(kind)["example"], cfg)
        cfg = yaml.safe_load(applied.config.read_text())  # the next change goes on top of this one
        if TARGETS[target]:
            (built / TARGETS[target]).unlink()
        planned = plan(built, applied, target)
        ran = jobs(snakemake(built, "--cores", "2", target, "--configfile", str(applied.config), snakefile=sf))
        assert ran == planned, (kind, target)
        if TARGETS[target]:
            assert (built / TARGETS[target]).is_file(), (kind, target)
        assert plan(built, applied, target) == set(), (kind, target)
    assert plan(built, applied) == set()  # the last target was `all`: everything is up to date
