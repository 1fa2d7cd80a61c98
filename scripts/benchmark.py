"""Timing ratios, printed (never asserted in tests).

  python scripts/benchmark.py                       # top-k JSD vs full-vocabulary JSD on random logits
  python scripts/benchmark.py --runs results/runs   # HDPO vs GRPO seconds per step, per phase, from metrics.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hdpo.losses import token_logprobs, topk_jsd


def full_jsd(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Reference: JSD over the full vocabulary (the teacher not truncated)."""
    p, q = torch.softmax(t_logits.float(), -1), torch.softmax(s_logits.float(), -1)
    m = (p + q) / 2
    return 0.5 * (p * (p.clamp_min(1e-30).log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)


def timeit(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def jsd_ratio(tokens: int, vocab: int, k: int) -> None:
    torch.manual_seed(0)
    t_logits = torch.randn(tokens, vocab)
    s_logits = torch.randn(tokens, vocab, requires_grad=True)
    vals, ids = t_logits.topk(k, -1)

    def topk():
        topk_jsd(vals, token_logprobs(s_logits, ids)).sum().backward()

    def full():
        full_jsd(t_logits, s_logits).sum().backward()

    a, b = timeit(topk), timeit(full)
    print(f"JSD fwd+bwd, {tokens} tokens x vocab {vocab}: top-{k} {a * 1e3:.1f} ms, full {b * 1e3:.1f} ms, "
          f"full/top-k = {b / a:.2f}x")


def step_ratios(runs: Path) -> None:
    per_method: dict[str, dict[str, float]] = {}
    for metrics in sorted(runs.glob("*/metrics.jsonl")):
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        train = [r for r in rows if r.get("kind") == "train"]
        if not train:
            continue
        keys = [k for k in train[0] if k.startswith("time/")]
        per_method[metrics.parent.name] = {k: statistics.mean(r[k] for r in train) for k in keys}
    base = next((v for k, v in per_method.items() if k.startswith("grpo")), None)
    for name, times in per_method.items():
        line = ", ".join(f"{k[5:]} {v:.1f}s" for k, v in times.items())
        ratio = f"  step vs GRPO: {times['time/step'] / base['time/step']:.2f}x" if base else ""
        print(f"{name}: {line}{ratio}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=None)
    args = ap.parse_args()
    if args.runs:
        step_ratios(args.runs)
    else:
        for vocab in (49152, 151936):
            jsd_ratio(tokens=256, vocab=vocab, k=64)
