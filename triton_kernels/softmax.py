"""Row-wise softmax family in Triton: log_softmax, softmax, mean; one program per row.

Per row z[0..V) (fp32 values of the input; the contract of ops/softmax.py, the operation sequence of
csrc/cpu/kernels/softmax.h except for the reduction tree and exp):
    mx  = max over a BLOCK-wide vector: acc[j] = max(acc[j], z[c*BLOCK + j]) for chunks c = 0, 1, ...
          (masked tail lanes -inf), then tl.max          (max is exact: any order gives its bits)
    s   = sum of exp(z - mx): acc[j] = acc[j] + exp(z[c*BLOCK + j] - mx) over the chunks in order
          (masked tail lanes +0), then one tl.sum (a fixed tree for a fixed BLOCK and num_warps)
    log_softmax: out = round((z - mx) - log(s))     softmax: out = round(exp(z - mx) / s)  (div_rn)
    mean:        round(sum(z) / V), the sum accumulated like s.
Two passes (max, then the sum against that max) rather than an online max: the sum then has the
contract's terms exp(z - mx) exactly, and each row's result is a function of its values only.
exp is tl.exp (NVIDIA: ex2.approx.f32 of x*log2(e), fixed per architecture) and log is tl.log,
once per row. BLOCK = _launch.row_block(V) (<= 4096) and num_warps depend on V only, never on the
number of rows. Rows of <= BLOCK elements are loaded once; longer rows (a vocabulary: V ~ 150k)
are streamed in BLOCK chunks (max pass, sum pass, write pass; the later passes mostly hit L2).
Inputs are first brought to the kernel variant of a contiguous tensor (_launch.canonical_layout):
the load layout, and with it the reduction tree, must not depend on a view's alignment. Loads are
widened with .to(tl.float32), results rounded with .to(dtype) (round to nearest even): the code the
GPU runs, also in the interpreter (bf16 there needs the test patch of its casts).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch

_LOG_SOFTMAX, _SOFTMAX, _MEAN = 0, 1, 2


@triton.jit
def _softmax_family_kernel(x_ptr, x_row_stride, out_ptr, V, MODE: tl.constexpr, BLOCK: tl.constexpr,
                           NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    offs = tl.arange(0, BLOCK)
    out_dtype = out_ptr.dtype.element_ty

    if MODE == 2:  # mean: one value per row
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            acc = acc + tl.load(x_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        mean = tl.div_rn(tl.sum(acc, axis=0), tl.cast(V, tl.float32))
        tl.store(out_ptr + row, mean.to(out_dtype))
    elif NUM_CHUNKS == 1:  # the whole row in registers
        mask = offs < V
        z = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        mx = tl.max(z, axis=0)
        e = tl.where(mask, tl.exp(z - mx), 0.0)
        s = tl.sum(e, axis=0)
        if MODE == 0:
            y = (z - mx) - tl.log(s)
        else:
            y = tl.div_rn(e, s)
        tl.store(out_ptr + row * V + offs, y.to(out_dtype), mask=mask)
    else:
        acc_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            acc_max = tl.maximum(acc_max, tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32))
        mx = tl.max(acc_max, axis=0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            m = cols < V
            z = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
            acc = acc + tl.where(m, tl.exp(z - mx), 0.0)
        s = tl.sum(acc, axis=0)
        lse = tl.log(s)
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            m = cols < V
            z = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
            if MODE == 0:
                y = (z - mx) - lse
            else:
                y = tl.div_rn(tl.exp(z - mx), s)
            tl.store(out_ptr + row * V + cols, y.to(out_dtype), mask=m)


# ------------------------------------------------------------------------------------------
# Launchers (signatures and results of the CPU extension's log_softmax / softmax / row_mean).

def _run(what: str, mode: int, x: torch.Tensor, out_dtype: torch.dtype, block: int | None) -> torch.Tensor:
    _launch.check_device(what, x)
    if x.dtype not in _launch.TL_DTYPES:
        raise TypeError(f"{what}: x must be bfloat16, float16 or float32, got {x.dtype} (shape {tuple(x.shape)})")
    if x.dim() != 2 or (x.size(1) > 1 and x.stride(1) != 1):
        raise ValueError(f"{what}: x must be 2-d [T, V] with a contiguous last dim, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}, dtype {x.dtype}")
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{what}: out_dtype must be x's dtype ({x.dtype}) or float32, got {out_dtype}")
    rows, width = x.shape
    out = torch.empty((rows,) if mode == _MEAN else (rows, width), dtype=out_dtype, device=x.device)
    if rows == 0 or width == 0:
        return out
    block = _launch.row_block(width) if block is None else block
    _launch.require_exact_bf16_casts(what, x)
    x = _launch.canonical_layout(x)  # the row reductions run in the load layout
    _softmax_family_kernel[(rows,)](x, x.stride(0), out, width, MODE=mode, BLOCK=block,
                                    NUM_CHUNKS=triton.cdiv(width, block),
                                    num_warps=_launch.row_warps(block), enable_fp_fusion=False)
    return out


def log_softmax(x: torch.Tensor, out_dtype: torch.dtype, *, _block: int | None = None) -> torch.Tensor:
    """x ``[T, V]`` -> log_softmax over V in ``out_dtype`` (x's dtype or fp32).
    ``_block`` (tests only) overrides the block; the default depends on V only."""
    return _run("log_softmax", _LOG_SOFTMAX, x, out_dtype, _block)


def softmax(x: torch.Tensor, out_dtype: torch.dtype, *, _block: int | None = None) -> torch.Tensor:
    """x ``[T, V]`` -> softmax over V in ``out_dtype`` (x's dtype or fp32)."""
    return _run("softmax", _SOFTMAX, x, out_dtype, _block)


def mean(x: torch.Tensor, out_dtype: torch.dtype, *, _block: int | None = None) -> torch.Tensor:
    """x ``[T, V]`` -> ``[T]`` row means in ``out_dtype`` (the CPU extension's ``row_mean``)."""
    return _run("mean", _MEAN, x, out_dtype, _block)


KERNELS = {"log_softmax": log_softmax, "softmax": softmax, "mean": mean}
