"""Row-wise softmax family over the last dim, fp32 math in a fixed block order.

log_softmax: out = (z - max) - log(sum(exp(z - max))), sum in the backend's fixed lane order.
softmax:     out = round(exp(z - max) / sum).        mean: round(sum(z) / V).
"""
from __future__ import annotations

import torch

from .. import backends
from ._common import as_rows, call, check_tensor, define


def _out_dtype(x, out_dtype, default):
    dtype = default if out_dtype is None else out_dtype
    if dtype not in (x.dtype, torch.float32):
        raise TypeError(f"out_dtype must be {x.dtype} (the input dtype) or torch.float32, got {dtype}")
    return dtype


def _row_op(name, default_fp32):
    def check(x, out_dtype):
        check_tensor("x", x, min_ndim=1)
        return _out_dtype(x, out_dtype, torch.float32 if default_fp32 else x.dtype)

    def impl(x, out_dtype=None):
        dtype = check(x, out_dtype)
        if x.numel() == 0:
            return x.new_empty(x.shape if name != "mean" else x.shape[:-1], dtype=dtype)
        out = backends.kernel(name, x.device)(as_rows(x), dtype)
        return out.view(x.shape if name != "mean" else x.shape[:-1])

    def fake(x, out_dtype=None):
        dtype = check(x, out_dtype)
        return x.new_empty(x.shape if name != "mean" else x.shape[:-1], dtype=dtype)

    define(f"{name}(Tensor x, ScalarType? out_dtype=None) -> Tensor", impl, fake)


_row_op("log_softmax", default_fp32=True)
_row_op("softmax", default_fp32=False)
_row_op("mean", default_fp32=False)


def log_softmax(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """log_softmax over the last dim; fp32 result by default (x's dtype on request)."""
    return call(torch.ops.batch_invariant.log_softmax, x, out_dtype)


def softmax(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """softmax over the last dim; x's dtype by default (fp32 on request)."""
    return call(torch.ops.batch_invariant.softmax, x, out_dtype)


def mean(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over the last dim (fp32 sum in a fixed order, one rounding)."""
    return call(torch.ops.batch_invariant.mean, x, out_dtype)


def log_softmax_ref(x, out_dtype=torch.float32):
    return torch.log_softmax(x.double(), dim=-1).to(out_dtype)


def softmax_ref(x, out_dtype=None):
    return torch.softmax(x.double(), dim=-1).to(out_dtype or x.dtype)


def mean_ref(x, out_dtype=None):
    return x.double().mean(-1).to(out_dtype or x.dtype)


def _register_cpu():
    ext = backends.cpu_extension()
    backends.register_kernel("cpu", "log_softmax", ext.log_softmax)
    backends.register_kernel("cpu", "softmax", ext.softmax)
    backends.register_kernel("cpu", "mean", ext.row_mean)


def _register_cuda():
    ext = backends.cuda_extension()
    backends.register_kernel("cuda", "log_softmax", ext.log_softmax)
    backends.register_kernel("cuda", "softmax", ext.softmax)
    backends.register_kernel("cuda", "mean", ext.row_mean)


# ------------------------------------------------------------------------------------------
# Autograd (row sums through bi.mean: fixed order).

def _save_output(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.in_dtype = inputs[0].dtype


def _log_softmax_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    g = grad.float()
    total = mean(g, torch.float32).unsqueeze(-1) * g.size(-1)
    return (g - torch.exp(out.float()) * total).to(ctx.in_dtype), None


def _softmax_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    y, g = out.float(), grad.float()
    dot = mean(g * y, torch.float32).unsqueeze(-1) * g.size(-1)
    return (y * (g - dot)).to(ctx.in_dtype), None


def _mean_setup(ctx, inputs, output):
    ctx.shape, ctx.in_dtype = inputs[0].shape, inputs[0].dtype


def _mean_backward(ctx, grad):
    return (grad.float().unsqueeze(-1) / ctx.shape[-1]).expand(ctx.shape).to(ctx.in_dtype), None


torch.library.register_autograd("batch_invariant::log_softmax", _log_softmax_backward, setup_context=_save_output)
torch.library.register_autograd("batch_invariant::softmax", _softmax_backward, setup_context=_save_output)
torch.library.register_autograd("batch_invariant::mean", _mean_backward, setup_context=_mean_setup)
