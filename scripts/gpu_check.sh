#!/usr/bin/env bash
# One-call GPU verification (see scripts/gpu_check.py for what it checks). On a bare CUDA machine
# with torch preinstalled, after `bash scripts/fetch_gpu_wheels.sh` was run where the registry is
# reachable and wheels/ travelled with the work tree:
#
#   bash scripts/gpu_check.sh                    # installs wheels/ (--no-deps) into .gpu_site/, runs on CUDA
#   bash scripts/gpu_check.sh --dry-run          # CPU, tiny shapes, the current environment, no install
#   OUT=/some/dir bash scripts/gpu_check.sh      # where gpu_check.json goes (default runs/gpu_check)
#
# Extra arguments go to scripts/gpu_check.py (e.g. --only loss_paths, --train-layers 32).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done
OUT="${OUT:-$REPO/runs/gpu_check}"
if [[ $DRY_RUN == 1 ]]; then
  PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
  exec "$PYTHON" -m scripts.gpu_check --device cpu --out "$OUT" "${ARGS[@]+"${ARGS[@]}"}"
fi

PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/wheels}"
SITE="${SITE:-$REPO/.gpu_site}"
start=$(date +%s)
if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  # The machine's torch stays; these land in a target folder put ahead of site-packages, so
  # the project's transformers / tokenizers / huggingface-hub shadow the machine's newer ones.
  # pip picks, per package, the wheel that fits this Python.
  # By name: the carried wheel that fits this Python.
  "$PYTHON" -m pip install --quiet --no-deps --no-index --find-links "$WHEELS" --target "$SITE" --upgrade \
    $(grep -v '^#' scripts/gpu_wheels.txt | awk 'NF {print $1}')
elif [[ ! -d "$SITE" ]]; then
  echo "note: no wheels in $WHEELS (run scripts/fetch_gpu_wheels.sh beforehand); using the installed packages"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
echo "install: $(( $(date +%s) - start )) s"
"$PYTHON" - <<'PY'
import importlib, sys
missing = []
for name in ("torch", "composer", "streaming", "transformers", "tokenizers", "omegaconf", "composer_remask.train.run"):
    try:
        module = importlib.import_module(name)
        print(f"{name:28s} {getattr(module, '__version__', '')}")
    except Exception as error:  # name what is missing before anything long starts
        missing.append(f"{name}: {type(error).__name__}: {error}")
if missing:
    sys.exit("cannot import the stack:\n  " + "\n  ".join(missing))
PY
exec "$PYTHON" -m scripts.gpu_check --out "$OUT" "${ARGS[@]+"${ARGS[@]}"}"
