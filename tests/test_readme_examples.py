"""The README's config examples are true as written: each YAML block layers over the paper's config and loads,
and the method example is a target of its own that trains one run."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from hdpo.config import deep_merge, from_dict, run_config

REPO = Path(__file__).resolve().parents[1]


def _yaml_blocks(path: Path) -> list[dict]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)]


def test_readme_yaml_examples_load_over_the_paper_config():
    paper = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    blocks = _yaml_blocks(REPO / "README.md") + _yaml_blocks(REPO / "workflow" / "README.md")
    assert len(blocks) >= 3
    for block in blocks:
        from_dict(deep_merge(paper, block))
    methods = deep_merge(paper, _yaml_blocks(REPO / "README.md")[0])["experiment"]["methods"]
    assert len(methods) == 7  # the example adds a record to the paper's five and expand-then-sharpen
    run = run_config(deep_merge(paper, _yaml_blocks(REPO / "README.md")[0]), "hdpo_topk8", 1)
    assert (run.hdpo.topk_logits_k, run.hdpo.distill_weight, run.run.label) == (8, 0.1, "HDPO drifting, λ=0.1, top-8")


def test_readme_method_example_is_a_target(tmp_path):
    from test_workflow import job_counts, snakemake

    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(_yaml_blocks(REPO / "README.md")[0], allow_unicode=True))

    out = snakemake(tmp_path, "hdpo_topk8", "-n", "--cores", "2", "--configfile", str(REPO / "config" / "demo.yaml"),
                    str(mine))
    # the demo's one benchmark (MATH-500) at the final and best checkpoints
    assert job_counts(out) == {"prepare_data": 1, "prepare_benchmark": 1, "train": 1, "evaluate": 2,
                               "hdpo_topk8": 1}
