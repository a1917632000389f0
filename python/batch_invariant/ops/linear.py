"""linear / matmul / bmm: y = x @ w.T (+ b) with a K order fixed by (K, dtype, backend, ISA).

Contract (contract.py, docs/invariance.md): fp32 accumulation in the backend's fixed K order,
never chosen by M or N; bias added in fp32 after the full sum; one rounding to the output dtype;
fp32 inputs in IEEE fp32 (never TF32).
"""
from __future__ import annotations

import torch

from .. import backends
from ._common import (as_rows, call, check_same_device, check_same_dtype, check_tensor,
                      define, describe, inner_contiguous)


def _out_dtype(x: torch.Tensor, out_dtype) -> torch.dtype:
    if out_dtype is None:
        return x.dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"out_dtype must be None, {x.dtype} (the input dtype) or torch.float32, got {out_dtype}")
    return out_dtype


def _check_linear(x, weight, bias, out_dtype) -> torch.dtype:
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_same_dtype(x=x, weight=weight)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.size(-1) != weight.size(1):
        raise ValueError(f"x's last dim ({describe(x)}) must equal weight's dim 1 ({describe(weight)}): "
                         "weight is [out_features, in_features]")
    if bias is not None:
        check_tensor("bias", bias, dtypes=(weight.dtype, torch.float32), ndim=1)
        if bias.size(0) != weight.size(0):
            raise ValueError(f"bias ({describe(bias)}) must have weight.size(0) = {weight.size(0)} elements")
    return _out_dtype(x, out_dtype)


def _linear_impl(x, weight, bias=None, out_dtype=None):
    dtype = _check_linear(x, weight, bias, out_dtype)
    rows = as_rows(x)
    fn = backends.kernel("linear", x.device)
    y = fn(rows, inner_contiguous(weight), None if bias is None else bias.contiguous(), dtype)
    return y.view(*x.shape[:-1], weight.size(0))


def _linear_fake(x, weight, bias=None, out_dtype=None):
    dtype = _check_linear(x, weight, bias, out_dtype)
    return x.new_empty((*x.shape[:-1], weight.size(0)), dtype=dtype)


define("linear(Tensor x, Tensor weight, Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
       _linear_impl, _linear_fake)


def _check_matmul(a, b):
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    check_same_dtype(a=a, b=b)
    check_same_device(a=a, b=b)
    if a.size(1) != b.size(0):
        raise ValueError(f"matmul needs a [M, K] and b [K, N]: got a {describe(a)}, b {describe(b)}")


def _matmul_impl(a, b):
    _check_matmul(a, b)
    # The kernels take the right operand as [N, K] rows; b.t() is free when b is a transposed weight.
    return backends.kernel("linear", a.device)(inner_contiguous(a), inner_contiguous(b.t()), None, a.dtype)


def _matmul_fake(a, b):
    _check_matmul(a, b)
    return a.new_empty((a.size(0), b.size(1)))


define("matmul(Tensor a, Tensor b) -> Tensor", _matmul_impl, _matmul_fake)


def _check_bmm(a, b):
    check_tensor("a", a, ndim=3)
    check_tensor("b", b, ndim=3)
    check_same_dtype(a=a, b=b)
    check_same_device(a=a, b=b)
    if a.size(0) != b.size(0) or a.size(2) != b.size(1):
        raise ValueError(f"bmm needs a [B, M, K] and b [B, K, N]: got a {describe(a)}, b {describe(b)}")


def _bmm_impl(a, b):
    _check_bmm(a, b)
    b_t = b.transpose(1, 2)
    return backends.kernel("bmm_nt", a.device)(a.contiguous(), b_t.contiguous(), a.dtype)


def _bmm_fake(a, b):
    _check_bmm(a, b)
    return a.new_empty((a.size(0), a.size(1), b.size(2)))


define("bmm(Tensor a, Tensor b) -> Tensor", _bmm_impl, _bmm_fake)


# ------------------------------------------------------------------------------------------
# Public functions

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (x ``[..., K]``, weight ``[N, K]``), batch-invariant.

    ``out_dtype=torch.float32`` returns the fp32 accumulator rounded once to fp32 (e.g. an fp32
    lm_head on bf16 operands); for a true fp32 head pass fp32 ``x`` and ``weight``.
    """
    return call(torch.ops.batch_invariant.linear, x, weight, bias, out_dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a ``[M, K]``, b ``[K, N]``, batch-invariant."""
    return call(torch.ops.batch_invariant.matmul, a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` for a ``[B, M, K]``, b ``[B, K, N]``; each batch as :func:`matmul`."""
    return call(torch.ops.batch_invariant.bmm, a, b)


# ------------------------------------------------------------------------------------------
# References (float64) for tests and benchmarks

def linear_ref(x, weight, bias=None, out_dtype=None):
    y = x.double() @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(out_dtype or x.dtype)


def matmul_ref(a, b):
    return (a.double() @ b.double()).to(a.dtype)


def _register_cpu():
    ext = backends.cpu_extension()
    backends.register_kernel("cpu", "linear", ext.linear)
    backends.register_kernel("cpu", "bmm_nt", ext.bmm_nt)


def _register_cuda():
    ext = backends.cuda_extension()
    backends.register_kernel("cuda", "linear", ext.linear)
    backends.register_kernel("cuda", "bmm_nt", ext.bmm_nt)



# ------------------------------------------------------------------------------------------
# Autograd (deterministic: every gradient is a batch_invariant matmul, fixed reduction order;
# mixed dtypes are computed in the promoted dtype and rounded once).

def _linear_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _ones_row(n, like):
    return torch.ones(1, n, dtype=like.dtype, device=like.device)


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    rows = x.reshape(-1, x.size(-1))
    g = grad.reshape(-1, weight.size(0))
    cd = torch.promote_types(g.dtype, x.dtype)
    g = g.to(cd)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = matmul(g, weight.to(cd)).to(x.dtype).view(x.shape)
    if ctx.needs_input_grad[1]:
        dw = matmul(g.t(), rows.to(cd)).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        db = matmul(_ones_row(g.size(0), g), g).view(-1).to(ctx.bias_dtype)
    return dx, dw, db, None


torch.library.register_autograd("batch_invariant::linear", _linear_backward, setup_context=_linear_setup)


def _matmul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    da = matmul(grad, b.t()) if ctx.needs_input_grad[0] else None
    db = matmul(a.t(), grad) if ctx.needs_input_grad[1] else None
    return da, db


torch.library.register_autograd("batch_invariant::matmul", _matmul_backward, setup_context=_matmul_setup)


def _bmm_backward(ctx, grad):
    a, b = ctx.saved_tensors
    da = bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
    db = bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
    return da, db


torch.library.register_autograd("batch_invariant::bmm", _bmm_backward, setup_context=_matmul_setup)
