"""Shared pieces of the op files: the torch.library namespace and input validation helpers.

Validation raises TypeError for wrong dtypes and ValueError for wrong shapes/devices, naming the
argument with its shape and dtype. It runs in the real *and* the fake implementation, so a bad
call fails the same way eagerly and under torch.compile.
"""
from __future__ import annotations

import torch

NAMESPACE = "batch_invariant"
LIB = torch.library.Library(NAMESPACE, "DEF")

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def define(schema: str, impl, fake) -> None:
    """Declare `schema` once and register the same Python impl for the CPU and CUDA keys.

    The impl resolves the backend (cpu / triton / cuda) from the tensors' device and the
    configuration; the fake impl only computes output metadata (torch.compile, meta tensors).
    """
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIB)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, ndim=None, min_ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {allowed} ({describe(t)})")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got {describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got {describe(t)}")


def check_same_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} ({describe(t)}) must have the dtype of {first_name} ({describe(first)})")


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: "
                             "all tensors of a batch_invariant op must be on one device")


def inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or a copy, with a contiguous last dim (copies only when the last stride is not 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] with a contiguous last dim, without copying when possible."""
    t = inner_contiguous(t)
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.size(-1))
    except RuntimeError:
        return t.reshape(-1, t.size(-1)).contiguous()


def call(op, *args):
    """Call a custom op from a public function; a non-tensor where a tensor belongs is a user
    error, so the dispatcher's RuntimeError for it becomes a TypeError."""
    try:
        return op(*args)
    except RuntimeError as exc:
        if "Expected a value of type" in str(exc):
            raise TypeError(str(exc).splitlines()[0]) from None
        raise
