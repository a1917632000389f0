#!/usr/bin/env bash
# Creates (or reuses) the venv that compiles the CUDA extension batch_invariant._cuda: a CUDA build
# of torch (requirements/cuda.txt) + build tools, outside the checkout, keyed by the hash of
# requirements/cuda.txt and the Python version. It does not install this checkout: the build check
# (tests/test_cuda_build.py, run by .ci/run) builds the extension from the checkout into a cache
# folder with this venv's python. A new key replaces the old venv (each is ~5.5 GB).
# Progress on stderr; the venv path on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/cuda.txt"
CACHE="${BATCH_INVARIANT_CACHE:-$HOME/.cache/batch-invariant-kernels}"
PY="${BATCH_INVARIANT_CUDA_PYTHON:-$(command -v python3.11 || command -v python3)}"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
KEY="$(sha256sum "$REQ" | cut -c1-16)"
VENV="$CACHE/cuda-venv-py$PYVER-$KEY"

if [ ! -f "$VENV/.complete" ]; then
  echo "[setup-cuda] creating $VENV (torch with CUDA, ~5.5 GB; a few minutes)" >&2
  mkdir -p "$CACHE"
  for old in "$CACHE"/cuda-venv-*; do
    [ -e "$old" ] && [ "$old" != "$VENV" ] && { echo "[setup-cuda] removing stale $old" >&2; rm -rf "$old"; }
  done
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$REQ" >&2
  # The build needs a CUDA torch and the nvidia.cu13 headers (setup.py: cuda_library_includes).
  "$VENV/bin/python" - >&2 <<'PYCHECK'
import importlib.util, os, sys, torch
if torch.version.cuda is None:
    sys.exit(f"[setup-cuda] torch {torch.__version__} is a CPU build; requirements/cuda.txt must pin a CUDA build")
sub = f"cu{torch.version.cuda.split('.')[0]}"
spec = importlib.util.find_spec("nvidia")
found = [p for d in (spec.submodule_search_locations if spec else []) if os.path.isdir(p := os.path.join(d, sub, "include"))]
if not found:
    sys.exit(f"[setup-cuda] no nvidia/{sub}/include in the venv (the CUDA library headers setup.py adds)")
print(f"[setup-cuda] torch {torch.__version__} (CUDA {torch.version.cuda}); library headers in {found[0]}")
PYCHECK
  touch "$VENV/.complete"
fi
echo "$VENV"
