#!/usr/bin/env bash
# Set up .venv (torch 2.7.0, Composer 0.32.1, streaming, transformers, lm-eval) and run the tests.
# Usage: bash scripts/test.sh [pytest args...]   (default: the whole CPU suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,eval,bench]'
.venv/bin/python -c "import streaming.base.util as u; u.clean_stale_shared_memory()"
if [ "$#" -eq 0 ]; then
  set -- -m "not gpu"
fi
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
