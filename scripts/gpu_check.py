"""The GPU check of issue 7 in one command (scripts/gpu_check.sh runs it after `hdpo preflight`).

  python scripts/gpu_check.py --out DIR [--tiny]

Measures, on this device and in this run, today's code (the full-logits path before chunking, copied in
scripts/benchmark.py, no activation checkpointing) against the package's update path at the configured
micro-batch of config/config.yaml, and the log-prob + JSD memory ratios at vocab 151936 (benchmark --memory).
Writes DIR/gpu_check.json. Without CUDA (or with --tiny) it runs at a tiny shape, for testing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402  (scripts/benchmark.py: the baseline copy of today's code)

from hdpo.config import load_config  # noqa: E402
from hdpo.preflight import TINY_TOKEN_BUDGET, measure_update, model_shape, random_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def baseline_update(model, grpo, distill, amp):
    n = sum(len(r) for _, r, _ in grpo)
    benchmark.baseline_grpo_microbatch(model, grpo, n, amp)
    benchmark.baseline_distill_microbatch(model, distill, n, amp)


def update_peaks(cfg, device, tiny: bool) -> dict:
    shape, source = model_shape(cfg.model.name, tiny)
    budget = cfg.grpo.micro_batch_tokens
    if tiny:
        budget = min(budget or TINY_TOKEN_BUDGET, TINY_TOKEN_BUDGET)
    out = {"shape": source}
    for name, ckpt, fn in (("today", False, baseline_update), ("now", cfg.model.activation_checkpointing, None)):
        model = random_model(shape, device, ckpt)
        res = measure_update(model, cfg, device, budget, tiny, update_fn=fn)
        res.pop("optimizer")
        out[name] = res
        del model, res
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = out[name]
        print(f"update micro-batch ({name}): {r['sequences']} x ({r['prompt_tokens']} + {r['response_tokens']}) "
              f"tokens: " + (f"peak {r['peak_gib']:.1f} GiB, " if r.get("peak_gib") is not None else "")
              + (f"{r['seconds']:.2f} s" if r["ok"] else r["error"]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip-ratios", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    cfg = load_config(args.config)
    t = time.time()
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "tiny": tiny,
              "update": update_peaks(cfg, device, tiny)}
    if not args.skip_ratios:
        kw = dict(vocab=4096, resp_len=128, path_positions=512) if tiny else {}
        report["memory_ratios"] = benchmark.memory_ratios(**kw)
    report["seconds"] = time.time() - t
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
