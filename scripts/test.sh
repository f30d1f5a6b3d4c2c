#!/usr/bin/env bash
# Set up .venv (torch 2.7.0, Composer 0.32.1, streaming, transformers, lm-eval) and run the tests.
# Also sets up .venv-foundry, a second environment with llm-foundry 0.22.0 next to this package (its pins
# differ from .venv's); tests/foundry drives it in subprocesses. The two installs run in parallel.
# Usage: bash scripts/test.sh [pytest args...]   (default: the whole CPU suite)
#   SKIP_FOUNDRY=1 bash scripts/test.sh ...    skips .venv-foundry (its tests then skip; under CI=true they fail)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

install_foundry_env() {
  if [ ! -x .venv-foundry/bin/python ]; then
    "$PYTHON" -m venv .venv-foundry
  fi
  .venv-foundry/bin/python -m pip install -q --upgrade pip
  # The constraints are the versions pip resolves for these requirements: no resolver backtracking.
  .venv-foundry/bin/python -m pip install -q -c scripts/foundry-constraints.txt 'llm-foundry==0.22.0' pytest -e .
}

foundry_pid=""
foundry_log=$(mktemp)
if [ "${SKIP_FOUNDRY:-0}" != "1" ]; then
  install_foundry_env > "$foundry_log" 2>&1 &
  foundry_pid=$!
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev,eval,bench]'

if [ -n "$foundry_pid" ]; then
  if ! wait "$foundry_pid"; then
    cat "$foundry_log" >&2
    echo "scripts/test.sh: installing .venv-foundry failed (log above)" >&2
    exit 1
  fi
fi

# What crashed streaming runs left in /dev/shm, never the segments of a run going on beside the tests.
.venv/bin/python -c "from composer_remask.tools.shared_memory import clean_unused_streaming_shared_memory as c; c()"
if [ "$#" -eq 0 ]; then
  set -- -m "not gpu"
fi
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
