#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment outside the checkout, keyed by the hash of
# requirements/test.txt, and installs this checkout into it (editable, building the C++ extension
# against the venv's torch: --no-build-isolation, so the extension matches the torch you run).
# Prints nothing but progress on stderr; the venv path on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/requirements/test.txt"
CACHE="${BATCH_INVARIANT_CACHE:-$HOME/.cache/batch-invariant-kernels}"
KEY="$(sha256sum "$REQ" | cut -c1-16)"
VENV="$CACHE/venv-py$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')-$KEY"

if [ ! -f "$VENV/.complete" ]; then
  echo "[setup] creating $VENV" >&2
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  "$VENV/bin/pip" install -q -r "$REQ" >&2
  # PyPI's builds of these are CUDA-linked and break `import transformers` / `import vllm` next to
  # the CPU torch (shared/PLATFORM.md); nothing here needs them.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  touch "$VENV/.complete"
fi
echo "[setup] building batch-invariant-kernels into $VENV" >&2
cd "$ROOT"
"$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . >&2
echo "$VENV"
