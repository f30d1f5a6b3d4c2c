#!/usr/bin/env bash
# Download the wheels the GPU check needs on a bare CUDA machine that has torch (2.11) and
# transformers 5.x but no Composer and no internet. Run beforehand, here, with registry access:
#
#   bash scripts/fetch_gpu_wheels.sh [DEST]        # default DEST: wheels/ (gitignored)
#   PYTHON_VERSIONS="3.11 3.12" bash scripts/fetch_gpu_wheels.sh
#
# Everything is fetched with --no-deps at pinned versions: Composer 0.32.1 pins torch<2.7.1, but it
# runs with the machine's newer torch, so the check installs these with --no-deps on top of it.
# The list (scripts/gpu_wheels.txt) is what `import composer, streaming, transformers, omegaconf` and train.py need and a
# torch + transformers 5.x machine lacks (read from their requirements): transformers<4.54 wants
# huggingface-hub<1.0 and tokenizers 0.21; Composer wants torchmetrics, lightning-utilities,
# torch-optimizer, pytorch-ranger, coolname, tabulate, py-cpuinfo, importlib-metadata, psutil;
# streaming imports its compressors (Brotli, python-snappy/cramjam, zstd), xxhash and catalogue at
# import time. Compiled ones are fetched for each Python in PYTHON_VERSIONS (the GPU machine's is
# not known in advance).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-wheels}"
PYTHON_VERSIONS="${PYTHON_VERSIONS:-3.10 3.11 3.12 3.13}"
PIP="${PIP:-python3 -m pip}"
mkdir -p "$DEST"

LIST=scripts/gpu_wheels.txt
PURE=($(grep -v '^#' "$LIST" | grep -v compiled | awk 'NF {print $1}'))
COMPILED=($(grep -v '^#' "$LIST" | grep compiled | awk 'NF {print $1}'))

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
