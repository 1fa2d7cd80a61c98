"""Unbiased pass@k from n samples per problem with c correct (Chen et al. 2021). Pure functions, no I/O."""
from __future__ import annotations


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, hold a correct one.

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which avoids the huge binomials.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(correct_counts: list[int], n: int, ks: list[int]) -> dict[str, float]:
    """Mean over problems of pass@k for each k: {"pass@1": ..., "pass@4": ...}."""
    if not correct_counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}
