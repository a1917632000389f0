"""Helpers shared by the Triton launchers (one file per op family beside this one).

Layering: ``@triton.jit`` kernels (no torch) -> launcher functions (checks, dtype dispatch, grid)
-> registered as the ``triton`` backend of the ``batch_invariant::*`` ops by ``ops/__init__.py``
(each module lists its launchers in ``KERNELS``). Launch configurations are functions of the
problem's fixed parameters (hidden size, K, dtype, head size) and of the device architecture,
never of the number of rows/tokens (the invariance contract).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import backends

#: torch dtype -> the Triton element type (bf16/fp16 operands; fp32 accumulation everywhere).
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def interpreting() -> bool:
    return backends.triton_interpreting()


@functools.lru_cache(maxsize=16)
def _arch_of(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def arch_key(device: torch.device) -> str:
    """``"interpreter"`` for CPU tensors under TRITON_INTERPRET, else the CUDA arch (``"sm_90"``)."""
    if device.type == "cpu":
        return "interpreter"
    return _arch_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=16)
def _sms_of(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def sm_count(device: torch.device, *, interpreter: int) -> int:
    """The device's SM count (sizes work splits that never change bits); `interpreter` stands in
    for it under the Triton interpreter, chosen by each launcher to keep its test shapes small."""
    if arch_key(device) == "interpreter":
        return interpreter
    return device_sms(device)


def device_sms(device: torch.device) -> int:
    return _sms_of(device.index if device.index is not None else torch.cuda.current_device())


def row_block(width: int, cap: int = 4096) -> int:
    """The fixed block (power of two) a row of `width` elements is processed in: a function of
    the width only, so every row of a tensor -- and a row alone -- takes the same reduction tree."""
    return min(triton.next_power_of_2(max(int(width), 1)), cap)


def row_warps(block: int) -> int:
    """num_warps as a function of the block (never of the row count): it fixes tl.sum's tree."""
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


def require_exact_bf16_casts(what: str, *tensors: torch.Tensor | None) -> None:
    """Fail closed in the interpreter when a kernel would convert bf16 <-> fp32 without the test
    patch (interpreter.exact_dot): the bare interpreter truncates fp32 -> bf16 (the GPU rounds to
    nearest even) and mishandles bf16 subnormals. The kernels use the plain casts the GPU runs
    (``.to(tl.float32)`` after a load, ``.to(dtype)`` to round), so that the interpreter tests the
    GPU's code; only the patched interpreter gives those casts the GPU's bits."""
    from . import interpreter

    if any(t is not None and t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors) and (
            interpreting() and not interpreter.is_active()):
        raise backends.BackendUnavailableError(
            f"{what}: the Triton interpreter converts fp32 -> bf16 by truncation and bf16 subnormals wrongly; "
            "run inside batch_invariant.triton_kernels.interpreter.exact_dot() (the test suite does) or use "
            "the cpu backend on CPU tensors")


# ------------------------------------------------------------------------------------------
# Canonical layout: the kernel variant must not depend on where a tensor happens to start.
#
# Triton compiles one variant of a kernel per *specialisation key*: a pointer argument is marked
# 16-byte aligned (or not), an integer argument divisible by 16 (or not) or equal to 1 (a
# constant). Those hints set the vector width of the loads (contiguity x alignment), hence the
# register layout the loaded row lands in, hence the order in which ``tl.sum`` / ``tl.max`` /
# ``tl.cumsum`` combine it (per-thread partial sums first, then the warp shuffles). A row's
# reduction tree must be a function of the row, so a view at an odd offset, or with a row stride
# of another residue mod 16, must run the variant a fresh contiguous tensor gets.
#
# Two ways to get there:
# * prevent the specialisation (``@triton.jit(do_not_specialize=[ints],
#   do_not_specialize_on_alignment=[pointers])``: in Triton since 3.2, checked in 3.9, whose
#   interpreter accepts them too). Every call, aligned or not, then runs the variant without the
#   hints: scalar loads (one element per instruction instead of 16 bytes) and a row stride of
#   unknown divisibility on the common, aligned path, for good.
# * copy the rare misaligned input into a fresh contiguous tensor (:func:`canonical_layout`):
#   free on the common path (a fresh torch allocation is always 16-byte aligned -- 64 bytes on
#   CPU, 512 on CUDA -- and its strides have the contiguous residues), one extra pass over the
#   tensor otherwise; and one compiled variant serves every call (no JIT compile in the middle
#   of serving because some view started at an odd offset).
# We copy. The launchers of kernels that reduce *loaded* data (norm, the softmax family,
# sampling's sums over the row, attention backward's Delta = rowsum(dO * O)) pass those inputs
# through it. Reductions over tl.dot outputs (attention's row max / sum of scores) run in the MMA
# accumulator layout, which the load layout does not change; elementwise kernels give the same
# bits in any layout.


def _contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return strides[::-1]


def _stride_key(stride: int) -> tuple[bool, bool]:
    """What Triton specialises an integer argument on: divisibility by 16 and == 1."""
    return stride % 16 == 0, stride == 1


def has_canonical_layout(t: torch.Tensor) -> bool:
    """True when ``t`` gets the kernel variant of a fresh contiguous tensor of its shape: its data
    16-byte aligned and every stride with the specialisation key of the contiguous stride."""
    return t.data_ptr() % 16 == 0 and all(
        _stride_key(s) == _stride_key(c) for s, c in zip(t.stride(), _contiguous_strides(t.shape)))


def canonical_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it already gets the kernel variant of a fresh contiguous tensor (the
    common case: no copy), else a fresh contiguous copy (see the comment above)."""
    if has_canonical_layout(t):
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def check_device(what: str, *tensors: torch.Tensor) -> None:
    """The triton backend runs on CUDA tensors, or on CPU tensors under the interpreter."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not interpreting():
            raise backends.BackendUnavailableError(
                f"{what}: the triton backend got CPU tensors without TRITON_INTERPRET=1; use the cpu backend")
        if t.device.type not in ("cpu", "cuda"):
            raise backends.BackendUnavailableError(f"{what}: the triton backend does not run on {t.device}")
