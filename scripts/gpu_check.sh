#!/usr/bin/env bash
# Issue 7's GPU check, about 5 minutes on one H100/H200 (random weights, no Hub, no vLLM needed):
#   1. hdpo preflight with config/config.yaml at the real Qwen2.5-Math-1.5B shape: kill/resume on CUDA, peak
#      memory of one update micro-batch at the configured budget (engine share reserved), checkpoint write
#      time, generation tokens/s of the transformers backend at batch 256 (128-token prompts, 256 new tokens)
#      for the bf16 copy and for the float32 master under autocast (the path before), printed as a table;
#   2. scripts/gpu_check.py: the same update micro-batch with today's (pre-chunking) code, and the log-prob +
#      JSD memory ratios at vocab 151936.
# JSON goes to $OUT (default results/gpu_check). Without CUDA both run at a tiny shape (for testing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
status=0
"$PY" -m hdpo preflight --config config/config.yaml --out "$OUT/preflight.json" --work-dir "${TMPDIR:-/tmp}/hdpo_preflight" \
    --gen-baseline "$@" || status=$?   # exit 1 = "does not fit": still run the comparison
"$PY" scripts/gpu_check.py --out "$OUT"
exit $status
