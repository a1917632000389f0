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


def row_block(width: int, cap: int = 4096) -> int:
    """The fixed block (power of two) a row of `width` elements is processed in: a function of
    the width only, so every row of a tensor -- and a row alone -- takes the same reduction tree."""
    return min(triton.next_power_of_2(max(int(width), 1)), cap)


def row_warps(block: int) -> int:
    """num_warps as a function of the block (never of the row count): it fixes tl.sum's tree."""
    return 8 if block >= 4096 else 4 if block >= 1024 else 2 if block >= 256 else 1


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
