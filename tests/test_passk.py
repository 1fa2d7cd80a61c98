import itertools
import math

import pytest

from hdpo.passk import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_matches_brute_force_for_all_small_cases():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_matches_binomial_formula_for_large_n():
    n, c, k = 200, 7, 16
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


def test_pass_at_1_is_fraction_correct():
    for n in range(1, 17):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


def test_edges():
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0  # n - c < k
    assert pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(1, 0, 1) == 0.0


@pytest.mark.parametrize("n,c,k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1), (0, 0, 0)])
def test_bad_arguments_raise(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k():
    counts = [0, 1, 4, 8]
    out = mean_pass_at_k(counts, 8, [1, 4, 8])
    assert list(out) == ["pass@1", "pass@4", "pass@8"]
    assert out["pass@1"] == pytest.approx(13 / 32)
    assert out["pass@4"] == pytest.approx((0 + 0.5 + brute_force(8, 4, 4) + 1) / 4)
    assert out["pass@8"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 8, [1])
    with pytest.raises(ValueError):
        mean_pass_at_k([1], 8, [9])
