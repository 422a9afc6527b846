#!/usr/bin/env bash
# Installs everything and runs the test suite. `--slow` runs only the heavier tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--slow" ]; then
  shift
  exec .venv/bin/python -m pytest -m slow -n 2 "$@"
fi
exec .venv/bin/python -m pytest -n 2 "$@"
