#!/usr/bin/env bash
# One short (< 5 min) single-GPU check of the real-scale path, without Ray: MoDE vs peft LoRA on a
# ≈0.66 B random-init Chameleon with the real 65,536-id vocabulary; tokens/s, peak memory, MFU.
#   scripts/gpu_check.sh              # results under $OUT (default ./gpu_check_out)
#   scripts/gpu_check.sh --tiny       # CPU smoke run
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_PYTHON=python
[[ -x .venv/bin/python ]] && DEFAULT_PYTHON=.venv/bin/python
PYTHON=${PYTHON:-$DEFAULT_PYTHON}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
