#!/usr/bin/env bash
# Install mode-cl with its dev tools into .venv, then run lint and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/run_tests.sh -k routing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh dev
VENV="${MODE_CL_VENV:-.venv}"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
set +e
"$VENV/bin/python" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "run_tests: pytest collected no tests — treating as failure" >&2
  exit 1
fi
exit "$status"
