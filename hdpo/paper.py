"""The paper's published numbers, keyed by our method names (see PAPER.md).

HDPO (arXiv 2603.23871 v1): best pass@k over training on the OpenMathInstruct-2 validation split (2048 problems),
one seed (42) per configuration, no error bars. Table 1 ran on 8 x H200, Table 3 repeats it on 8 x H100.
"""
from __future__ import annotations

PAPER_SEED = 42
PAPER_SELECTION = "best"  # the paper reports the best value of each metric over training

# source name -> human label (the `source` column of results/tables/table1.csv)
SOURCES: dict[str, str] = {
    "paper_h200": "paper 8×H200 (Table 1)",
    "paper_h100": "paper 8×H100 (Table 3)",
}

# source -> method -> metric -> value
PAPER_RESULTS: dict[str, dict[str, dict[str, float]]] = {
    "paper_h200": {
        "grpo": {"pass@1": 0.6519, "pass@4": 0.7749, "pass@8": 0.8228},
        "hdpo_frozen_lambda0.01": {"pass@1": 0.6519, "pass@4": 0.7812, "pass@8": 0.8218},
        "hdpo_frozen_lambda0.1": {"pass@1": 0.6304, "pass@4": 0.7812, "pass@8": 0.8398},
        "hdpo_drifting_lambda0.01": {"pass@1": 0.6514, "pass@4": 0.7861, "pass@8": 0.8271},
        "hdpo_drifting_lambda0.1": {"pass@1": 0.6294, "pass@4": 0.7856, "pass@8": 0.8364},
    },
    "paper_h100": {
        "grpo": {"pass@1": 0.6509, "pass@4": 0.7739, "pass@8": 0.8223},
        "hdpo_frozen_lambda0.01": {"pass@1": 0.6484, "pass@4": 0.7773, "pass@8": 0.8252},
        "hdpo_frozen_lambda0.1": {"pass@1": 0.6343, "pass@4": 0.7856, "pass@8": 0.8369},
        "hdpo_drifting_lambda0.01": {"pass@1": 0.6499, "pass@4": 0.7783, "pass@8": 0.8213},
        "hdpo_drifting_lambda0.1": {"pass@1": 0.6343, "pass@4": 0.7832, "pass@8": 0.8359},
    },
}


def paper_value(source: str, method: str, metric: str) -> float | None:
    """The paper's number, or None where the paper has none (another method, another k, greedy accuracy)."""
    return PAPER_RESULTS.get(source, {}).get(method, {}).get(metric)
