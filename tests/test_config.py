"""The typed config's own mechanics: dotted keys, run configs, and validation once per config."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hdpo import config as hdpo_config
from hdpo.config import ConfigError, deep_merge, expand_dotted, from_dict, load_config, run_config

DEMO = Path(__file__).resolve().parents[1] / "config" / "demo.yaml"


def test_dotted_keys_merge_over_the_nested_ones_they_name():
    data = {"grpo.max_num_steps": 5, "grpo": {"max_num_steps": 3, "micro_batch_size": 4}, "a.b.c": 1, "seed": 2}
    assert expand_dotted(data) == {"grpo": {"max_num_steps": 5, "micro_batch_size": 4}, "seed": 2,
                                   "a": {"b": {"c": 1}}}
    assert data["grpo"] == {"max_num_steps": 3, "micro_batch_size": 4}  # the input is left as it was


def test_a_dotted_key_replaces_a_value_that_is_no_mapping():
    assert expand_dotted({"eval": 3, "eval.top_p": 0.9}) == {"eval": {"top_p": 0.9}}


@pytest.fixture()
def checks(monkeypatch) -> list[int]:
    """Counts the value checks of the typed config."""
    count = [0]
    check = hdpo_config._check

    def counted(cfg):
        count[0] += 1
        check(cfg)

    monkeypatch.setattr(hdpo_config, "_check", counted)
    return count


def test_each_config_is_checked_once(checks):
    """The merged config once, then each method's run config once (the demo has 6 methods); one run's config
    built from it is checked once more."""
    cfg = load_config(DEMO)
    assert checks[0] == 1 + len(cfg.experiment.methods) == 7
    checks[0] = 0
    run_config(cfg, "grpo", seed=3)
    assert checks[0] == 1


def test_a_job_checks_the_merged_config_and_its_run_config_once_each(checks):
    """`hdpo train --method M --seed S` (what a workflow job runs): 2 checks, not one per method of the grid."""
    from hdpo.cli import _config, _parser

    args = _parser().parse_args(["train", "--config", str(DEMO), "--method", "grpo", "--seed", "3", "--data", "d",
                                 "--run-dir", "r", "--work-dir", "w"])
    cfg = _config(args)
    assert checks[0] == 2 and (cfg.run.method, cfg.seed) == ("grpo", 3)


def test_a_run_config_is_the_same_from_a_config_or_its_data():
    data = yaml.safe_load(DEMO.read_text())
    cfg = from_dict(data)
    one = run_config(cfg, "hdpo_ets_drifting_lambda0.1", seed=7)
    assert one == run_config(data, "hdpo_ets_drifting_lambda0.1", seed=7)
    assert (one.seed, one.run.method, one.hdpo.teacher, one.hdpo.reinject_cliffs_after_steps) == (
        7, "hdpo_ets_drifting_lambda0.1", "drifting", 1)


def test_a_bad_method_setting_names_the_method():
    data = deep_merge(yaml.safe_load(DEMO.read_text()),
                      {"experiment": {"methods": {"grpo": {"settings": {"hdpo.topk_logits_k": 0}}}}})
    with pytest.raises(ConfigError, match=r"^experiment\.methods\.grpo\.settings: hdpo\.topk_logits_k: must be >= 1$"):
        from_dict(data)
