"""Test-only patch of the Triton interpreter's ``tl.dot`` and fp32 -> bf16 cast (TRITON_INTERPRET=1).

Three defects of the interpreter make it useless for checking our kernels bit for bit:

* bf16 operands are stored as raw ``uint16`` bit patterns and ``np.matmul`` multiplies those
  patterns as integers (errors ~1e11; upstream declined to fix it). We widen bf16 to fp32 first
  (exact: bf16 is the top half of an fp32).
* ``np.matmul`` may change its summation order with the tile shape, which would make "a different
  BLOCK_M gives the same bits" tests meaningless. We accumulate over k sequentially, one fused
  multiply-add per step (product exact in float64, one rounding to fp32 per step): a fixed order
  like a GPU MMA's, whatever the tile shape.
* its fp32 -> bf16 cast truncates (``x.to(tl.bfloat16)`` has no rounding mode, and its RTNE path
  gets ties and carries wrong), while the GPU rounds to nearest even. We round to nearest even
  with integer operations (NaN stays a quiet NaN), which is what the GPU and torch do; and its
  bf16 -> fp32 cast mishandles subnormals, so we widen by a 16-bit shift (exact).

The patch is installed only by the test suite and the GPU acceptance script's ``--dry-run``
(:func:`exact_dot`, reversible). Launchers of kernels with a ``tl.dot`` (:func:`require_exact_dot`)
or a bf16 rounding (``_launch.require_exact_bf16_casts``) fail closed in the interpreter without
it, so the interpreter always runs exactly the GPU's code.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

_lock = threading.Lock()
_depth = 0
_original = None
# create_fp_trunc etc. are lambdas bound to cast_impl at class creation: patch them all.
_PATCHED = ("create_dot", "cast_impl", "create_fp_trunc", "create_fp_ext")


def _widen(handle, tl) -> np.ndarray:
    data = handle.data
    if handle.dtype.scalar == tl.bfloat16 or handle.dtype == tl.bfloat16:
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32)


def _sequential_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if d.data.dtype != np.float32:
        raise NotImplementedError(f"batch_invariant's interpreter dot accumulates in fp32 only, got {d.data.dtype}")
    a32, b32 = _widen(a, tl), _widen(b, tl)
    acc = d.data.astype(np.float64)
    out = d.data.astype(np.float32).copy()
    for k in range(a32.shape[-1]):
        # fma(a, b, acc): the product of two fp32 values is exact in float64; round once to fp32.
        acc = out.astype(np.float64) + a32[..., :, k:k + 1].astype(np.float64) * b32[..., k:k + 1, :].astype(np.float64)
        out = acc.astype(np.float32)
    return TensorHandle(out, d.dtype.scalar)


def _bf16_rtne(data: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(data), np.uint16(0x7FC0) | ((bits >> 16).astype(np.uint16) & 0x8000), rounded)


def _make_cast(original_cast):
    def cast_impl(self, src, dst_type):
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle

        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(_bf16_rtne(src.data), dst_type.scalar)
        if src.dtype.scalar == tl.bfloat16 and dst_type.scalar == tl.float32:  # exact, subnormals too
            return TensorHandle((src.data.astype(np.uint32) << 16).view(np.float32), dst_type.scalar)
        return original_cast(self, src, dst_type)
    return cast_impl


def is_active() -> bool:
    return _depth > 0


@contextlib.contextmanager
def exact_dot():
    """Within this context the interpreter's ``tl.dot`` widens bf16 and sums k in order, and its
    fp32 -> bf16 cast rounds to nearest even."""
    global _depth, _original
    from triton.runtime.interpreter import InterpreterBuilder

    with _lock:
        if _depth == 0:
            _original = {name: InterpreterBuilder.__dict__[name] for name in _PATCHED}
            InterpreterBuilder.create_dot = _sequential_dot
            cast = _make_cast(_original["cast_impl"])
            for name in _PATCHED[1:]:
                setattr(InterpreterBuilder, name, cast)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name, fn in _original.items():
                    setattr(InterpreterBuilder, name, fn)
                _original = None


def require_exact_dot(what: str) -> None:
    """Fail closed: in the interpreter, a kernel using ``tl.dot`` needs the patch above."""
    from .. import backends

    if backends.triton_interpreting() and not is_active():
        raise backends.BackendUnavailableError(
            f"{what}: the Triton interpreter computes tl.dot on bf16 from raw bit patterns and in a "
            "shape-dependent order; run inside batch_invariant.triton_kernels.interpreter.exact_dot() "
            "(the test suite does) or use the cpu backend on CPU tensors")
