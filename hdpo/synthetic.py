"""Problems the code generates from a seed: real arithmetic for experiments that need a pool with a known
difficulty (the mechanism experiment, config/mechanism.yaml), with no download.

A dataset spec with `generator: <name>` (and `limit: N`, `generator_seed: S`) yields N rows with the fields
`id`, `problem`, `answer` and `solution`, mapped like any other source. Each row is a function of (name, seed,
index) alone, so the pool is the same on every machine.

The problem text never holds the answer's expression ("Add 431 and 254.", not "431 + 254"): math-verify
evaluates an unboxed expression in a response, so a student that merely repeated "431 + 254" would be scored
correct.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator


def addition(n: int, seed: int, digits: int = 3) -> Iterator[dict]:
    """Sums of two `digits`-digit numbers. The worked solution (what the teacher sees under
    hdpo.privileged_info: solution) is one line ending in the boxed sum."""
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    for i in range(n):
        rng = random.Random(f"addition:{digits}:{seed}:{i}")  # a string seed hashes the same on any Python
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        yield {"id": f"add{digits}-{seed}-{i}", "problem": f"Add {a} and {b}.", "answer": str(a + b),
               "solution": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}


GENERATORS: dict[str, Callable[[int, int], Iterator[dict]]] = {
    "addition3": lambda n, seed: addition(n, seed, 3),
    "addition4": lambda n, seed: addition(n, seed, 4),
}


def generate(name: str, n: int, seed: int) -> list[dict]:
    if name not in GENERATORS:
        raise KeyError(name)
    return list(GENERATORS[name](n, seed))
