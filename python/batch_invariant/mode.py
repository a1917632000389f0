"""Batch-invariant mode for third-party torch code: a reversible, re-entrant aten override.

    with bi.batch_invariant_mode():
        logits = some_hf_model(ids).logits      # mm/addmm/bmm/softmax/mean run on bi kernels

While at least one context is active, the leaf aten ops ``mm``, ``addmm`` (alpha/beta honoured),
``bmm``, ``_softmax``, ``_log_softmax`` and ``mean.dim`` are overridden on the CPU and CUDA
dispatch keys. Composite ops (``linear``, ``matmul``, ``F.softmax``) decompose into these, and
autograd stays intact because the overrides sit below the autograd key (backward formulas call
the same overridden leaves). Leaving the last context removes every override; nothing global is
left behind. Dtypes other than bf16/fp16/fp32 raise NotImplementedError (fail closed) rather than
run batch-variant.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch

from .ops._common import FLOAT_DTYPES

_lock = threading.RLock()
_depth = 0
_library: torch.library.Library | None = None


def _check_dtype(op: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            # NotImplementedError, not TypeError: torch turns a TypeError inside `a @ b` into
            # Python's generic "unsupported operand" message, hiding the cause.
            raise NotImplementedError(f"batch_invariant_mode: aten::{op} on {t.dtype} tensors has no batch-invariant "
                            f"kernel (supported: bfloat16, float16, float32); shape {tuple(t.shape)}")


def _mm(a, b):
    _check_dtype("mm", a, b)
    return torch.ops.batch_invariant.matmul(a, b)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    _check_dtype("addmm", bias, a, b)
    if alpha == 1 and beta == 1 and bias.dim() == 1 and bias.dtype in (a.dtype, torch.float32):
        # F.linear's case: bias added in fp32 after the full sum, one rounding (the contract).
        return torch.ops.batch_invariant.linear(a, b.t(), bias, None)
    acc = torch.ops.batch_invariant.linear(a, b.t(), None, torch.float32)
    out = acc if alpha == 1 else acc * alpha
    if beta != 0:
        out = out + (bias.float() if beta == 1 else bias.float() * beta)
    return out.to(a.dtype)


def _bmm(a, b):
    _check_dtype("bmm", a, b)
    return torch.ops.batch_invariant.bmm(a, b)


def _softmax_like(name):
    def impl(x, dim, half_to_float):
        _check_dtype(f"_{name}", x)
        out_dtype = torch.float32 if half_to_float else x.dtype
        moved = x.movedim(dim, -1)
        fn = getattr(torch.ops.batch_invariant, name)
        return fn(moved, out_dtype).movedim(-1, dim).contiguous()
    return impl


def _mean_dim(x, dim, keepdim=False, *, dtype=None):
    _check_dtype("mean.dim", x)
    if dtype is not None and dtype != x.dtype:
        x = x.to(dtype)
        _check_dtype("mean.dim", x)
    dims = sorted({d % x.dim() for d in (dim if dim is not None and len(dim) else range(x.dim()))})
    keep = [d for d in range(x.dim()) if d not in dims]
    moved = x.permute(*keep, *dims)
    rows = moved.reshape(*moved.shape[:len(keep)], -1)
    out = torch.ops.batch_invariant.mean(rows, None)
    if keepdim:
        for d in dims:
            out = out.unsqueeze(d)
    return out


_OVERRIDES = {
    "mm": _mm,
    "addmm": _addmm,
    "bmm": _bmm,
    "_softmax": _softmax_like("softmax"),
    "_log_softmax": _softmax_like("log_softmax"),
    "mean.dim": _mean_dim,
}


def _install() -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        # Overriding aten kernels is the point here (and is undone by _destroy()).
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name, fn in _OVERRIDES.items():
            for key in ("CPU", "CUDA"):
                lib.impl(name, fn, key)
    return lib


def enable() -> None:
    """Enter batch-invariant mode (counted: pair each call with :func:`disable`)."""
    global _depth, _library
    with _lock:
        if _depth == 0:
            _library = _install()
        _depth += 1


def disable() -> None:
    """Leave one level of batch-invariant mode; the overrides go when the count reaches zero."""
    global _depth, _library
    with _lock:
        if _depth == 0:
            raise RuntimeError("batch_invariant.disable() called without a matching enable()")
        _depth -= 1
        if _depth == 0 and _library is not None:
            _library._destroy()
            _library = None


def is_enabled() -> bool:
    return _depth > 0


@contextlib.contextmanager
def batch_invariant_mode():
    """Context manager form of :func:`enable` / :func:`disable`; re-entrant and exception-safe."""
    enable()
    try:
        yield
    finally:
        disable()
