"""rms_norm and fused_add_rms_norm, one row at a time in a fixed reduction order.

Contract: z = x (+ residual, rounded to the model dtype: the new residual); sum of z^2 in fp32 in
the backend's fixed lane order; r = 1/sqrt(sum/H + eps); out = round((z * r) * w).
"""
from __future__ import annotations

import torch

from .. import backends
from ._common import as_rows, call, check_same_device, check_same_dtype, check_tensor, define, describe


def _check_norm(x, weight, eps, residual=None):
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, dtypes=(x.dtype, torch.float32), ndim=1)
    check_same_device(x=x, weight=weight, residual=residual)
    if weight.size(0) != x.size(-1):
        raise ValueError(f"weight ({describe(weight)}) must have x.size(-1) = {x.size(-1)} elements")
    if residual is not None:
        check_tensor("residual", residual)
        check_same_dtype(x=x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual ({describe(residual)}) must have the shape of x ({describe(x)})")
    if not isinstance(eps, float) or not eps >= 0.0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")


def _rms_norm_impl(x, weight, eps):
    _check_norm(x, weight, eps)
    out = backends.kernel("rms_norm", x.device)(as_rows(x), weight.contiguous(), eps)
    return out.view(x.shape)


def _rms_norm_fake(x, weight, eps):
    _check_norm(x, weight, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", _rms_norm_impl, _rms_norm_fake)


def _fused_impl(x, residual, weight, eps):
    _check_norm(x, weight, eps, residual)
    out, res = backends.kernel("fused_add_rms_norm", x.device)(as_rows(x), as_rows(residual),
                                                                weight.contiguous(), eps)
    return out.view(x.shape), res.view(x.shape)


def _fused_fake(x, residual, weight, eps):
    _check_norm(x, weight, eps, residual)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


define("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
       _fused_impl, _fused_fake)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` with ``weight`` (x's dtype or fp32)."""
    return call(torch.ops.batch_invariant.rms_norm, x, weight, float(eps))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = x + residual`` (rounded to x's dtype); returns ``(rms_norm(z), z)``."""
    return call(torch.ops.batch_invariant.fused_add_rms_norm, x, residual, weight, float(eps))


def rms_norm_ref(x, weight, eps):
    z = x.double()
    r = torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
    return (z * r * weight.double()).to(x.dtype)


def fused_add_rms_norm_ref(x, residual, weight, eps):
    z = (x.double() + residual.double()).to(x.dtype)
    return rms_norm_ref(z, weight, eps), z


def _register_cpu():
    ext = backends.cpu_extension()
    backends.register_kernel("cpu", "rms_norm", ext.rms_norm)
    backends.register_kernel("cpu", "fused_add_rms_norm", ext.fused_add_rms_norm)


def _register_cuda():
    ext = backends.cuda_extension()
    backends.register_kernel("cuda", "rms_norm", ext.rms_norm)
    backends.register_kernel("cuda", "fused_add_rms_norm", ext.fused_add_rms_norm)


# ------------------------------------------------------------------------------------------
# Autograd. fp32 math; row reductions through bi.mean and the weight gradient through a
# batch_invariant matmul (ones @ G), so every reduction has a fixed order (deterministic).

def _rms_backward_core(gy, z, weight, eps):
    from .linear import matmul
    from .softmax import mean

    h = z.size(-1)
    z = z.reshape(-1, h).float()
    g = gy.reshape(-1, h).float()
    w = weight.float()
    r = torch.rsqrt(mean(z * z, torch.float32) + eps).unsqueeze(1)
    gw = g * w
    dot = mean(gw * z, torch.float32).unsqueeze(1)
    dz = r * (gw - z * (r * r) * dot)
    dw = matmul(torch.ones(1, z.size(0), dtype=torch.float32, device=z.device), g * z * r).view(-1)
    return dz, dw


def _rms_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dz, dw = _rms_backward_core(grad, x, weight, ctx.eps)
    return dz.to(x.dtype).view(x.shape), dw.to(weight.dtype), None


torch.library.register_autograd("batch_invariant::rms_norm", _rms_backward, setup_context=_rms_setup)


def _fused_setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _fused_backward(ctx, grad_out, grad_residual):
    z, weight = ctx.saved_tensors
    dz, dw = _rms_backward_core(grad_out, z, weight, ctx.eps)
    dz = dz.view(z.shape)
    if grad_residual is not None:
        dz = dz + grad_residual.float()
    dz = dz.to(z.dtype)
    return dz, dz, dw.to(weight.dtype), None


torch.library.register_autograd("batch_invariant::fused_add_rms_norm", _fused_backward, setup_context=_fused_setup)
