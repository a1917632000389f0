#!/usr/bin/env bash
# GPU acceptance check of the Triton backend (and the CUDA one once it exists), in one command:
#
#   bash bench/gpu_check.sh [--out DIR] [--dry-run]
#
# On a bare CUDA machine (Python >= 3.11, torch >= 2.11 with CUDA, Triton >= 3.6, nvcc; no vLLM,
# no network) it installs nothing: the package is staged in a temporary folder (python/ and
# triton_kernels/ copied, extensions built there when possible), then
#   1. the GPU subset of the tests (tests/triton on CUDA tensors: correctness, invariance over M,
#      bucket equivalence for this architecture, prefill == chunked == decode; the CUDA
#      extension's kernels on the GPU, incl. bitwise equality with the CPU SIMT simulator),
#   2. the benchmarks (Triton, and the CUDA extension when built) vs cuBLAS / flash SDPA / torch on Qwen3-8B shapes
#      (python/batch_invariant/bench/gpu.py), CSV files + a PNG written into --out,
#   3. a short table, printed last.
# Budget: <= 5 minutes on an H100/H200. --dry-run runs the same logic on the CPU through the
# Triton interpreter at tiny shapes (CI does this; no GPU needed).
set -uo pipefail

OUT=bench/results
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR, --dry-run)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[gpu_check] $*" | tee -a "$LOG"; }
STATUS=0

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  unset BATCH_INVARIANT_TEST_DEVICE
  TEST_ARGS=(-k "bucket")  # the full interpreter suite runs in CI anyway; this checks the wiring
else
  export BATCH_INVARIANT_TEST_DEVICE=cuda
  unset TRITON_INTERPRET
  TEST_ARGS=(tests/cuda/test_cuda_device.py tests/test_cuda_build.py)  # CUDA-extension kernels on the GPU
fi

# Use an installed batch_invariant if there is one; otherwise stage the sources (no install).
if ! (cd /tmp && "$PY" -c "import batch_invariant.triton_kernels" 2>/dev/null); then
  STAGE="$(mktemp -d)"
  trap 'rm -rf "$STAGE"' EXIT
  cp -r "$ROOT/python/batch_invariant" "$STAGE/batch_invariant"
  rm -rf "$STAGE/batch_invariant/triton_kernels" "$STAGE"/batch_invariant/_*.so
  cp -r "$ROOT/triton_kernels" "$STAGE/batch_invariant/triton_kernels"
  export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
  say "staged the package in $STAGE (nothing installed)"
  if [ "$DRY" = 0 ]; then
    # Build what can be built, into the stage (CPU extension; the CUDA one when csrc/cuda has kernels).
    BUILD="$(mktemp -d)"
    if (cd "$ROOT" && timeout 200 "$PY" setup.py -q build_ext --build-lib "$STAGE" --build-temp "$BUILD") \
        >>"$LOG" 2>&1; then
      say "extensions built into the stage"
    else
      say "extension build failed or timed out (see $LOG); tests that need it skip, with the reason"
    fi
  fi
fi

say "tests: $([ "$DRY" = 1 ] && echo 'interpreter (dry run)' || echo 'CUDA') -- pytest tests/triton ${TEST_ARGS[*]}"
(cd "$ROOT" && PYTHONUNBUFFERED=1 timeout 240 "$PY" -m pytest tests/triton -q -p no:cacheprovider \
   "${TEST_ARGS[@]}" --junitxml="$OUT/gpu_check_tests.xml") 2>&1 | tee -a "$LOG"
TEST_RC=${PIPESTATUS[0]}
[ "$TEST_RC" = 0 ] || { say "tests FAILED (exit $TEST_RC)"; STATUS=1; }

say "benchmarks -> $OUT"
BENCH_ARGS=(--out "$OUT")
[ "$DRY" = 1 ] && BENCH_ARGS+=(--dry-run)
(cd /tmp && PYTHONUNBUFFERED=1 timeout 200 "$PY" -m batch_invariant.bench.gpu "${BENCH_ARGS[@]}") 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
[ "$BENCH_RC" = 0 ] || { say "benchmark reported failures (exit $BENCH_RC)"; STATUS=1; }

say "tests exit $TEST_RC, benchmarks exit $BENCH_RC; log: $LOG"
exit $STATUS
