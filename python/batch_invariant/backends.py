"""Backend registry and selection.

A *backend* is a family of kernels that follow the invariance contract: ``cpu`` (C++ extension
``batch_invariant._cpu``), ``triton`` (``batch_invariant.triton_kernels``) and ``cuda`` (C++/CUDA
extension ``batch_invariant._cuda``). The backend is chosen by configuration and by the device of
the tensors, **never by shape**:

* ``BATCH_INVARIANT_BACKEND=auto`` (default): CPU tensors -> ``cpu``; CUDA tensors -> ``cuda`` when
  that extension is built, else ``triton``.
* an explicit name (env var or :func:`set_backend`) is used as asked; if it cannot run on the
  tensors' device, or is not installed, the op raises :class:`BackendUnavailableError` saying how
  to get it. There is no silent fallback.

Kernels register themselves per (backend, op) with :func:`register_kernel`; ``ops/<op>.py`` looks
them up with :func:`kernel`. Tests skip a backend by asking :func:`has_kernel`.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import threading
from typing import Callable

import torch

BACKEND_NAMES = ("cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKEND_NAMES
ENV_BACKEND = "BATCH_INVARIANT_BACKEND"

_lock = threading.Lock()
_override: str | None = None  # set_backend(); None -> environment
_KERNELS: dict[tuple[str, str], Callable] = {}
_LOADERS: dict[str, Callable[[], None]] = {}  # backend -> function that registers its kernels
_loaded: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """An explicitly requested (or required) backend cannot run here."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"unknown batch_invariant backend {name!r}; choose one of {', '.join(_CHOICES)}")
    return name.lower()


def set_backend(name: str | None) -> None:
    """Select the backend for this process (``None`` returns to ``$BATCH_INVARIANT_BACKEND``)."""
    global _override
    with _lock:
        _override = None if name is None else _check_name(name)
    _resolve.cache_clear()


def get_backend() -> str:
    """The configured backend name: ``auto``, ``cpu``, ``triton`` or ``cuda``."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get(ENV_BACKEND, "auto") or "auto")


# ------------------------------------------------------------------------------------------
# Availability

def cpu_extension():
    """The compiled CPU extension module (raises BackendUnavailableError with a fix if missing)."""
    try:
        return importlib.import_module("batch_invariant._cpu")
    except ImportError as exc:
        raise BackendUnavailableError(
            "the batch_invariant CPU extension is not built (batch_invariant._cpu: "
            f"{exc}). Install the package with `pip install --no-build-isolation .` "
            "(or `-e .`) against the torch you use.") from exc


def cuda_extension():
    """The compiled CUDA extension module (raises BackendUnavailableError with a fix if missing).

    Importing it needs no GPU; it does need the CUDA build of torch it was compiled against."""
    try:
        return importlib.import_module("batch_invariant._cuda")
    except ImportError as exc:
        raise BackendUnavailableError(
            "the batch_invariant CUDA extension is not built or does not load (batch_invariant._cuda: "
            f"{exc}). Reinstall with `pip install --no-build-isolation .` on a machine with nvcc and "
            "the CUDA build of torch you use, without BATCH_INVARIANT_SKIP_CUDA_BUILD") from exc


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_unavailable_reason(name: str, device_type: str) -> str | None:
    """None if `name` can run on `device_type` here, else why not (with how to fix it)."""
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors only (got {device_type} tensors)"
        try:
            cpu_extension()
        except BackendUnavailableError as exc:
            return str(exc)
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "the triton backend needs Triton (`pip install 'triton>=3.6'`)"
        if device_type == "cpu" and not triton_interpreting():
            return ("the triton backend runs on CPU tensors only under the Triton interpreter "
                    "(set TRITON_INTERPRET=1 before importing batch_invariant); use the cpu backend")
        if device_type not in ("cpu", "cuda"):
            return f"the triton backend does not support {device_type} tensors"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors only (got {device_type} tensors)"
        if importlib.util.find_spec("batch_invariant._cuda") is None:
            return ("the batch_invariant CUDA extension is not built: reinstall on a machine with "
                    "nvcc and a CUDA build of torch, without BATCH_INVARIANT_SKIP_CUDA_BUILD")
        try:
            cuda_extension()
        except BackendUnavailableError as exc:
            return str(exc)
        return None
    return f"unknown backend {name!r}"


def available_backends(device_type: str = "cpu") -> list[str]:
    return [b for b in BACKEND_NAMES if backend_unavailable_reason(b, device_type) is None]


@functools.lru_cache(maxsize=64)
def _resolve(configured: str, device_type: str) -> str:
    if configured == "auto":
        if device_type == "cpu":
            name = "cpu"
        elif device_type == "cuda":
            name = "cuda" if backend_unavailable_reason("cuda", "cuda") is None else "triton"
        else:
            raise BackendUnavailableError(f"batch_invariant has no backend for {device_type} tensors")
    else:
        name = configured
    reason = backend_unavailable_reason(name, device_type)
    if reason is not None:
        how = "" if configured == "auto" else f" ({ENV_BACKEND}/set_backend asked for {name!r})"
        raise BackendUnavailableError(reason + how)
    return name


def resolve(device: torch.device | str) -> str:
    """The backend that runs ops on `device` under the current configuration."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _resolve(get_backend(), device_type)


# ------------------------------------------------------------------------------------------
# Kernel registry

def register_kernel(backend: str, op: str, fn: Callable) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}")
    _KERNELS[(backend, op)] = fn


def register_loader(backend: str, loader: Callable[[], None]) -> None:
    """A function that imports `backend`'s kernel modules (and so registers them) on first use."""
    _LOADERS[backend] = loader


def _ensure_loaded(backend: str) -> None:
    if backend in _loaded:
        return
    with _lock:
        if backend not in _loaded:
            loader = _LOADERS.get(backend)
            if loader is not None:
                loader()
            _loaded.add(backend)


def has_kernel(backend: str, op: str) -> bool:
    """True when `backend` has a kernel for `op` (tests use this to skip unbuilt kernels)."""
    try:
        _ensure_loaded(backend)
    except BackendUnavailableError:
        return False
    return (backend, op) in _KERNELS


def kernel(op: str, device: torch.device) -> Callable:
    """The kernel for `op` on `device` under the current configuration (fails loudly)."""
    backend = resolve(device)
    fn = _KERNELS.get((backend, op))
    if fn is None:
        _ensure_loaded(backend)
        fn = _KERNELS.get((backend, op))
    if fn is None:
        raise BackendUnavailableError(f"batch_invariant::{op} has no kernel in the {backend!r} backend yet")
    return fn
