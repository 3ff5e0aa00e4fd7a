#!/usr/bin/env bash
# Install mode-cl into .venv and run the main job on the embedded default.
# Extra arguments go to the main command.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec "${MODE_CL_VENV:-.venv}/bin/mode-cl" run "$@"
