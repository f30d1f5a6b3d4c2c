#!/usr/bin/env bash
# The README's first command. From a fresh clone: create .venv and install (if missing), build the
# sample corpus as MDS, train yamls/tiny_cpu.yaml (ReMask-CoT, ~4M parameters, CPU), export a
# Hugging Face folder and run a local GSM8K-style evaluation on held-out rows.
#
#   bash scripts/demo.sh                  # outputs under runs/demo/
#   DEMO_DIR=/tmp/demo bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR="${DEMO_DIR:-runs/demo}"
PY=.venv/bin/python
start=$(date +%s)
step() { printf '\n== %s (%ss) ==\n' "$1" "$(( $(date +%s) - start ))"; }

step "environment"
if [ ! -x "$PY" ]; then
  python3 -m venv .venv
fi
installed() {  # the package's console scripts and its heavy dependencies, without importing them
  [ -x .venv/bin/remask-data ] && [ -x .venv/bin/remask-eval ] && "$PY" -c \
    "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('composer', 'lm_eval', 'streaming')))"
}
if ! installed; then
  .venv/bin/pip install --upgrade pip
  .venv/bin/pip install -e '.[dev,eval]'
fi

step "sample corpus -> MDS"
"$PY" -m composer_remask.tools.fixtures "$DEMO_DIR/raw" >/dev/null
.venv/bin/remask-data build --overwrite --tokenizer assets/tiny-tokenizer --max-seq-len 256 \
  --source tinycot="$DEMO_DIR/raw/tinycot.jsonl" \
  --source oasst2="$DEMO_DIR/raw/oasst2.jsonl" \
  --source reddit="$DEMO_DIR/raw/reddit.jsonl" \
  --out "$DEMO_DIR/corpus"
# Held-out rows (another seed) for the eval loader and the local GSM8K-style evaluation.
"$PY" -m composer_remask.tools.fixtures "$DEMO_DIR/heldout-raw" --rows 64 --seed 1 >/dev/null
.venv/bin/remask-data build --overwrite --tokenizer assets/tiny-tokenizer --max-seq-len 256 \
  --source tinycot="$DEMO_DIR/heldout-raw/tinycot.jsonl" --out "$DEMO_DIR/heldout"

step "train yamls/tiny_cpu.yaml"
rm -rf "$DEMO_DIR/tiny-cpu"   # a fresh run each time (autoresume would continue an old one)
"$PY" train.py yamls/tiny_cpu.yaml \
  variables.data_dir="$DEMO_DIR/corpus" \
  variables.eval_data_dir="$DEMO_DIR/heldout" \
  variables.run_dir="$DEMO_DIR/tiny-cpu"

step "evaluate the export (lm-evaluation-harness, local task)"
.venv/bin/remask-eval "$DEMO_DIR/tiny-cpu/hf" --device cpu --prompt-format remask \
  --gsm8k-jsonl "$DEMO_DIR/heldout-raw/tinycot.jsonl" --limit 32 --max-gen-toks 96

step "done"
echo "checkpoints: $DEMO_DIR/tiny-cpu/checkpoints   HF export: $DEMO_DIR/tiny-cpu/hf"
