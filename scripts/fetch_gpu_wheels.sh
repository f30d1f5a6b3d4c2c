#!/usr/bin/env bash
# Download the wheels the GPU check needs on a bare CUDA machine that has torch and transformers 5.x
# but no Composer and no internet. Run beforehand, here, with registry access and the project's
# .venv installed (the versions are read from it, i.e. from pyproject.toml's pins):
#
#   bash scripts/fetch_gpu_wheels.sh [DEST]        # default DEST: wheels/ (gitignored)
#   PYTHON_VERSIONS="3.11 3.12" bash scripts/fetch_gpu_wheels.sh
#
# Everything is fetched with --no-deps: Composer pins an older torch, but it runs with the machine's
# newer one, so the check installs these with --no-deps on top of it. The list
# (scripts/gpu_wheels.txt) is what `import composer, streaming, transformers, omegaconf` and
# train.py need and a torch + transformers 5.x machine lacks, read from their requirements: the
# project's transformers wants an older huggingface-hub and tokenizers; Composer wants torchmetrics,
# lightning-utilities, torch-optimizer, pytorch-ranger, coolname, tabulate, py-cpuinfo,
# importlib-metadata, psutil; streaming imports its compressors (Brotli, python-snappy/cramjam,
# zstd), xxhash and catalogue at import time. Compiled ones are fetched for each Python in
# PYTHON_VERSIONS (the GPU machine's is not known in advance): the tested version where it has a
# wheel for that Python, else the newest that does.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-wheels}"
PYTHON_VERSIONS="${PYTHON_VERSIONS:-3.10 3.11 3.12 3.13}"
PYTHON="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
PIP="${PIP:-$PYTHON -m pip}"
mkdir -p "$DEST"

LIST=scripts/gpu_wheels.txt
pinned() {  # NAME... -> NAME==VERSION as installed here
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{name} is not installed in {sys.prefix}: install the project first (bash scripts/test.sh)")
PY
}
PURE=($(pinned $(grep -v '^#' "$LIST" | grep -v compiled | awk 'NF {print $1}')))
COMPILED=($(pinned $(grep -v '^#' "$LIST" | grep compiled | awk 'NF {print $1}')))

$PIP download --no-deps --dest "$DEST" "${PURE[@]}"
PLATFORMS=(--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
for version in $PYTHON_VERSIONS; do
  for spec in "${COMPILED[@]}"; do
    # The pinned version (the one CI runs) where it has a wheel for this Python, else the newest that does.
    $PIP download --no-deps --only-binary=:all: "${PLATFORMS[@]}" --python-version "$version" --dest "$DEST" \
      "$spec" 2>/dev/null \
      || $PIP download --no-deps --only-binary=:all: "${PLATFORMS[@]}" --python-version "$version" \
        --dest "$DEST" "${spec%%==*}" \
      || echo "warning: no $spec wheel for Python $version"
  done
done
ls "$DEST" > "$DEST/MANIFEST.txt"
echo "fetched $(wc -l < "$DEST/MANIFEST.txt") wheels into $DEST; carry it to the GPU machine with the work tree"
