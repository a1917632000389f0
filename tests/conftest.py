"""Test configuration shared by every test module.

* TRITON_INTERPRET=1 is set here, before any kernel module is imported, unless a GPU run is asked
  for (BATCH_INVARIANT_TEST_DEVICE=cuda): Triton kernels then run on CPU tensors.
* pytest runs with --import-mode=importlib (pyproject.toml), so the repository root is never on
  sys.path and the folder triton_kernels/ cannot shadow the `triton_kernels` package vLLM probes.
* `backend` fixtures are parametrised over every backend and skip, with the reason, when a
  backend has no kernel for the op here (decided at run time from the registry).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# `python -m pytest` from the checkout puts it on sys.path, where triton_kernels/ would shadow
# the package vLLM probes for: keep the repository root off sys.path.
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

if os.environ.get("BATCH_INVARIANT_TEST_DEVICE", "cpu") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import batch_invariant as bi  # noqa: E402
from batch_invariant import backends  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def selected_device() -> torch.device:
    return torch.device(os.environ.get("BATCH_INVARIANT_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    return selected_device()


@pytest.fixture(params=backends.BACKEND_NAMES)
def backend(request):
    """Runs the test under each backend; skips a backend that cannot run here."""
    name = request.param
    reason = backends.backend_unavailable_reason(name, selected_device().type)
    if reason is not None:
        pytest.skip(f"backend {name}: {reason}")
    bi.set_backend(name)
    yield name
    bi.set_backend(None)


def require_kernel(backend_name: str, op: str) -> None:
    if not backends.has_kernel(backend_name, op):
        pytest.skip(f"backend {backend_name} has no {op} kernel built here")


@pytest.fixture
def require():
    return require_kernel
