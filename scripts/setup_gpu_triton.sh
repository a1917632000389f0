#!/usr/bin/env bash
# Installs (or reuses) requirements/gpu-triton.txt into a folder outside the checkout, keyed by
# the file's hash and the Python version, with the pip of the python given as $1 (the test venv):
# only the Triton wheel (--no-deps; ~190 MB). Progress on stderr; the folder on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:?usage: setup_gpu_triton.sh PYTHON}"
REQ="$ROOT/requirements/gpu-triton.txt"
CACHE="${BATCH_INVARIANT_CACHE:-$HOME/.cache/batch-invariant-kernels}"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
DIR="$CACHE/gpu-triton-py$PYVER-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -f "$DIR/.complete" ]; then
  echo "[setup-gpu-triton] installing $(grep -v '^#' "$REQ" | xargs) into $DIR" >&2
  for old in "$CACHE"/gpu-triton-*; do
    [ -e "$old" ] && [ "$old" != "$DIR" ] && rm -rf "$old"
  done
  rm -rf "$DIR"
  "$PY" -m pip install -q --no-deps --target "$DIR" -r "$REQ" >&2
  touch "$DIR/.complete"
fi
echo "$DIR"
