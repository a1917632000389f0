"""silu_and_mul: out = round(silu(a) * b) for x = [a | b], fp32 math, one rounding."""
from __future__ import annotations

import torch

from .. import backends
from ._common import as_rows, call, check_tensor, define, describe


def _check(x):
    check_tensor("x", x, min_ndim=1)
    if x.size(-1) % 2 != 0:
        raise ValueError(f"silu_and_mul needs an even last dim ([..., 2*D]), got {describe(x)}")


def _impl(x):
    _check(x)
    out = backends.kernel("silu_and_mul", x.device)(as_rows(x))
    return out.view(*x.shape[:-1], x.size(-1) // 2)


def _fake(x):
    _check(x)
    return x.new_empty((*x.shape[:-1], x.size(-1) // 2))


define("silu_and_mul(Tensor x) -> Tensor", _impl, _fake)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :D]) * x[..., D:]`` for ``x`` of shape ``[..., 2*D]``."""
    return call(torch.ops.batch_invariant.silu_and_mul, x)


def silu_and_mul_ref(x):
    a, b = x.double().chunk(2, dim=-1)
    return (a * torch.sigmoid(a) * b).to(x.dtype)


def _register_cpu():
    backends.register_kernel("cpu", "silu_and_mul", backends.cpu_extension().silu_and_mul)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    a, b = x.float().chunk(2, dim=-1)
    s = torch.sigmoid(a)
    silu = a * s
    g = grad.float()
    da = g * b * (s * (1 + a * (1 - s)))
    return torch.cat([da, g * silu], dim=-1).to(x.dtype)


torch.library.register_autograd("batch_invariant::silu_and_mul", _backward, setup_context=_setup)
