#!/usr/bin/env bash
# Create .venv (if missing) and install robuq_fx with its test extras.
# torch: the CPU wheel torch==2.13.0 when no torch is installed yet. A constraints file pins torch for every
# install step, so no dependency's resolve can swap in a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
V=.venv/bin/python
CONS=$(mktemp)
trap 'rm -f "$CONS"' EXIT
if "$V" -c "import torch" 2>/dev/null; then
  echo "torch==$("$V" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$CONS"
else
  echo "torch==2.13.0" > "$CONS"
  "$V" -m pip install -q --upgrade pip
  "$V" -m pip install -q -c "$CONS" "torch==2.13.0"
fi
"$V" -m pip install -q -c "$CONS" -e ".[test]"
