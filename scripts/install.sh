#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install mode-cl into it.
#   scripts/install.sh          runtime dependencies
#   scripts/install.sh dev      plus test/lint tools
# torch: an already-installed torch (e.g. a GPU node's CUDA build) is kept. Otherwise torch
# 2.13.0 is installed first — on CPU machines with the local wheel this is the fast CPU build;
# set MODE_CL_TORCH_SPEC (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
# to choose another build. The project's own requirement is a range, so pip never replaces it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MODE_CL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "${PIP[@]}" install ${MODE_CL_TORCH_SPEC:-torch==2.13.0} 2>&1 | grep -v "^WARNING: Location" || true
fi
EXTRAS=""
[ "${1:-}" = "dev" ] && EXTRAS="[dev]"
"${PIP[@]}" install -e ".${EXTRAS}" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, ray, transformers, peft, mlflow; print(f'mode-cl env: torch {torch.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, mlflow {mlflow.__version__}')"
