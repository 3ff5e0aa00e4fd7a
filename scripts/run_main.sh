#!/usr/bin/env bash
# Install mode-cl into .venv and run the main job: the default sweep on the embedded digits
# benchmark (local Ray, embedded MLflow server), under a fresh timestamped sweep name.
# Extra arguments go to `mode-cl sweep`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec "${MODE_CL_VENV:-.venv}/bin/mode-cl" sweep search_spaces/digits_sweep.yaml \
  --name "digits_sweep-$(date +%Y%m%d-%H%M%S)" "$@"
