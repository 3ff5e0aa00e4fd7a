#!/usr/bin/env bash
# The paper-style methods table (benchmarks/digits_methods.py) on one GPU machine, without Ray or
# network: JOBS single-run processes share the GPU, training with bf16 autocast (use_gpu). The
# data and pretrained base models of the seeds come in WORK_DIR (pretraining runs on the CPU, so
# build them beforehand, e.g. with a CPU run of the benchmark, and carry the folder).
#   OUT=dir JOBS=12 SECONDS_LEFT=480 scripts/gpu_methods_table.sh [digits_methods.py args]
# First a micro run of seq_lora and mode on the GPU, so a broken environment fails in seconds.
# Results go to $OUT/table (all_results.jsonl, summary.md): runs finished before SECONDS_LEFT are
# kept, and the same call on the same $OUT continues with the others.
# WHEELS=dir installs the wheels in dir into a private site folder first (for a machine whose
# transformers is older than pyproject.toml's pin: before 5.24 the KV cache is ignored and decoding
# refuses to run).
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_PYTHON=python3
[[ -x .venv/bin/python ]] && DEFAULT_PYTHON=.venv/bin/python
PYTHON=${PYTHON:-$DEFAULT_PYTHON}
OUT=${OUT:-gpu_methods_out}
WORK_DIR=${WORK_DIR:-mode-cl-work}
mkdir -p "$OUT/table"
if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mode-cl-site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/mode-cl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
"$PYTHON" - <<'PY'
import tempfile, torch, transformers, peft
from pathlib import Path
from tests.conftest import MICRO_RUN
from trainables.config import load_run_config
from trainables.engine import run_sequence
print(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}", flush=True)
with tempfile.TemporaryDirectory() as root:
    for method in ("seq_lora", "mode"):
        config = load_run_config(None, [*MICRO_RUN, f"method.name={method}", "resources.use_gpu=true"])
        result = run_sequence(config, Path(root), None, log=lambda _: None)
        print(f"smoke {method}: acc {result['acc_matrix'][-1]}, {result['profile']['seconds']['total']:.1f} s", flush=True)
PY
set +e
timeout "${SECONDS_LEFT:-480}" "$PYTHON" benchmarks/digits_methods.py --jobs "${JOBS:-12}" --set resources.use_gpu=true \
  --work-dir "$WORK_DIR" --out "$OUT/table" --runs /tmp/digits_methods_runs "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/log.txt"
set -e
"$PYTHON" benchmarks/digits_methods.py --summarize --set resources.use_gpu=true --out "$OUT/table" "$@" | tail -30
