#!/usr/bin/env bash
# GRPO vs HDPO step time on the real SmolLM2-135M-Instruct (issue 7, item 7): a few training steps of GRPO,
# of HDPO, and of HDPO with hdpo.privileged_start=speculative; 16 prompts x 8 rollouts, up to 256 new tokens,
# transformers backend, bf16 on a GPU; then seconds per 1k generated tokens per phase (benchmark.py --runs).
# Needs the GGUF (GGUF=path), the SVAMP mirror (HDPO_DATA_DIR) and the gguf package; or, instead of the GGUF,
# MODEL=a model folder (e.g. random weights of the same shape). On a CPU, shrink it for a smoke test:
#   GGUF=... STEPS=1 PROMPTS=2 K=2 NEW=16 bash scripts/gpu_phases.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-results/gpu_phases}"
STEPS="${STEPS:-4}" PROMPTS="${PROMPTS:-16}" K="${K:-8}" NEW="${NEW:-256}"
DTYPE="${DTYPE:-$("$PY" -c 'import torch; print("bfloat16" if torch.cuda.is_available() else "float32")')}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
work="${TMPDIR:-/tmp}/hdpo_phases"
rm -rf "$work" && mkdir -p "$work" "$OUT"
if [ -n "${MODEL:-}" ]; then SRC=("model.name=$MODEL" model.gguf_package=null model.gguf_file=null)
else SRC=(model.gguf_package=null "model.gguf_file=$GGUF"); fi
SET=("${SRC[@]}" "model.dtype=$DTYPE" model.max_total_sequence_length=1024
     "grpo.num_prompts_per_step=$PROMPTS" "grpo.num_generations_per_prompt=$K" "grpo.max_num_steps=$STEPS"
     "generation.max_new_tokens=$NEW" generation.batch_size=256 "hdpo.max_cliff_prompts_per_step=$PROMPTS"
     data.max_val_problems=4 eval.num_samples=2 "eval.pass_k=[1,2]" eval.val_period=1000 checkpoint.save_period=1000
     eval.reward_workers=4)
"$PY" -m hdpo prepare-data --config config/demo.yaml --set "${SET[@]}" --out "$work/data"
# name:method:setting; HDPO twice: privileged rollouts after a group's rollouts, and beside them (same samples)
for run in grpo:grpo hdpo:hdpo_drifting_lambda0.1:hdpo.privileged_start=after_rollouts \
           hdpo_speculative:hdpo_drifting_lambda0.1:hdpo.privileged_start=speculative
do
  IFS=: read -r name method extra <<< "$run"
  "$PY" -m hdpo train --config config/demo.yaml --set "${SET[@]}" ${extra:+"$extra"} --method "$method" --seed 42 \
      --data "$work/data" --run-dir "$work/runs/${name}_seed42" --work-dir "$work/ckpt/$name" \
      --model-cache "$work/models" 2> "$OUT/train_$name.log" || { tail -30 "$OUT/train_$name.log"; exit 1; }
  cp "$work/runs/${name}_seed42/metrics.jsonl" "$OUT/metrics_$name.jsonl"
done
"$PY" scripts/benchmark.py --runs "$work/runs" | tee "$OUT/phases.txt"
