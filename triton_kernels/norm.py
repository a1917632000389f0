"""RMSNorm Triton kernels: rms_norm and fused_add_rms_norm, one program per row.

Per row of H elements (the contract, ops/norm.py; same operation sequence as csrc/cpu/kernels/norm.h
except for the order of the sum):
    z   = x                        (fused: z = round(x + residual), written as the new residual)
    ss  = sum of z*z in fp32: a BLOCK-wide vector acc[j] = fma(z[c*BLOCK + j], z[c*BLOCK + j], acc[j])
          over the chunks c = 0, 1, ... in order (masked tail lanes add fma(0, 0, acc) = acc),
          then one tl.sum (a fixed tree for a fixed BLOCK and num_warps)
    r   = 1 / sqrt(ss / H + eps)   (IEEE div_rn / sqrt_rn, these four operations in this order)
    out = round((z * r) * w)       (two fp32 multiplies, one rounding)
BLOCK = block_for(H) and num_warps = _launch.row_warps(BLOCK) depend on H only, never on the number
of rows, so a row alone and the same row in any batch take the same reduction tree. Rows that fit
one block (H <= 8192: every Llama/Qwen hidden size up to 70B) are loaded once and kept in
registers; wider rows take a second pass over memory (recomputing z, bitwise the same values).
Inputs are first brought to the kernel variant of a contiguous tensor (_launch.canonical_layout):
the load layout, and with it tl.sum's tree, must not depend on a view's alignment. Loads are
widened with .to(tl.float32) and results rounded with .to(dtype) (round to nearest even), the code
the GPU runs; bf16 in the interpreter needs the test patch of its casts (require_exact_bf16_casts).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _residual_sum(x_ptr, res_ptr, res_out_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE: tl.constexpr):
    # z for the columns `cols` of one row, in fp32. Fused: z = round(x + residual) to the model
    # dtype (the new residual, stored when STORE), and the norm reads that rounded value.
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z_rounded = (x + res).to(res_out_ptr.dtype.element_ty)
        if STORE:
            tl.store(res_out_ptr + cols, z_rounded, mask=mask)
        return z_rounded.to(tl.float32)
    else:
        return x


@triton.jit
def _rms_norm_kernel(x_ptr, x_row_stride, res_ptr, res_row_stride, res_out_ptr, w_ptr, out_ptr, H, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = res_ptr + row * res_row_stride
    res_out_row = res_out_ptr + row * H  # outputs are contiguous [T, H]
    out_row = out_ptr + row * H
    offs = tl.arange(0, BLOCK)

    # Pass 1: the sum of squares, lane j of the accumulator owning columns j, BLOCK + j, ...
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if NUM_CHUNKS == 1:
        mask = offs < H
        z = _residual_sum(x_row, res_row, res_out_row, offs, mask, HAS_RESIDUAL, True)
        acc = tl.fma(z, z, acc)
    else:
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            zc = _residual_sum(x_row, res_row, res_out_row, cols, cols < H, HAS_RESIDUAL, True)
            acc = tl.fma(zc, zc, acc)
    ss = tl.sum(acc, axis=0)
    r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(ss, tl.cast(H, tl.float32)) + eps))

    # Pass 2: out = round((z * r) * w).
    out_dtype = out_ptr.dtype.element_ty
    if NUM_CHUNKS == 1:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + offs, ((z * r) * w).to(out_dtype), mask=mask)
    else:
        for c in range(NUM_CHUNKS):
            cols = c * BLOCK + offs
            m = cols < H
            zc = _residual_sum(x_row, res_row, res_out_row, cols, m, HAS_RESIDUAL, False)
            w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(out_row + cols, ((zc * r) * w).to(out_dtype), mask=m)


# ------------------------------------------------------------------------------------------
# Launchers (signatures and results of the CPU extension's rms_norm / fused_add_rms_norm).

def _check_rows(what: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in _launch.TL_DTYPES:
        raise TypeError(f"{what}: {name} must be bfloat16, float16 or float32, got {t.dtype} (shape {tuple(t.shape)})")
    if t.dim() != 2 or (t.size(1) > 1 and t.stride(1) != 1):
        raise ValueError(f"{what}: {name} must be 2-d [T, H] with a contiguous last dim, got shape "
                         f"{tuple(t.shape)}, strides {t.stride()}, dtype {t.dtype}")


def _check_weight(what: str, weight: torch.Tensor, x: torch.Tensor) -> None:
    if weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"{what}: weight dtype must be x's ({x.dtype}) or float32, got {weight.dtype}")
    if weight.dim() != 1 or weight.size(0) != x.size(1) or (weight.size(0) > 1 and weight.stride(0) != 1):
        raise ValueError(f"{what}: weight must be contiguous 1-d [{x.size(1)}], got shape {tuple(weight.shape)}, "
                         f"strides {weight.stride()}")


def block_for(hidden: int) -> int:
    """The reduction block for rows of `hidden` elements (a function of H only)."""
    return _launch.row_block(hidden, cap=8192)


def _launch_norm(x, residual, weight, eps, out, res_out, block):
    rows, hidden = x.shape
    if rows == 0 or hidden == 0:
        return
    block = block_for(hidden) if block is None else block
    has_residual = residual is not None
    _launch.require_exact_bf16_casts("fused_add_rms_norm" if has_residual else "rms_norm", x, weight)
    # The sum of squares reduces loaded data: x, residual and weight (all in the row's layout)
    # get the kernel variant of fresh tensors (_launch.canonical_layout).
    x, weight = _launch.canonical_layout(x), _launch.canonical_layout(weight)
    residual = _launch.canonical_layout(residual) if has_residual else None
    _rms_norm_kernel[(rows,)](
        x, x.stride(0), residual if has_residual else x, residual.stride(0) if has_residual else 0,
        res_out if has_residual else out, weight, out, hidden, float(eps),
        HAS_RESIDUAL=has_residual, BLOCK=block, NUM_CHUNKS=triton.cdiv(hidden, block),
        num_warps=_launch.row_warps(block), enable_fp_fusion=False)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, _block: int | None = None) -> torch.Tensor:
    """x ``[T, H]`` (contiguous last dim), weight ``[H]`` (x's dtype or fp32) -> ``[T, H]``.

    ``_block`` (tests only) overrides the block of the reduction; the default depends on H only.
    """
    _launch.check_device("rms_norm", x, weight)
    _check_rows("rms_norm", "x", x)
    _check_weight("rms_norm", weight, x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(x, None, weight, eps, out, None, _block)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       _block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z = round(x + residual); returns ``(rms_norm(z), z)`` (new tensors, contiguous)."""
    _launch.check_device("fused_add_rms_norm", x, residual, weight)
    _check_rows("fused_add_rms_norm", "x", x)
    _check_rows("fused_add_rms_norm", "residual", residual)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rms_norm: residual ({tuple(residual.shape)}, {residual.dtype}) must match x "
                         f"({tuple(x.shape)}, {x.dtype})")
    _check_weight("fused_add_rms_norm", weight, x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_norm(x, residual, weight, eps, out, res_out, _block)
    return out, res_out


KERNELS = {"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm}
