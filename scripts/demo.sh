#!/usr/bin/env bash
# Main job: set up (cached venv outside the checkout, editable install), then run the demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh")"
cd "$HOME"  # never run from the checkout: its triton_kernels/ folder must not be on sys.path
exec "$VENV/bin/batch-invariant" demo "$@"
