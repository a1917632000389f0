"""Test configuration shared by every test module.

* TRITON_INTERPRET=1 is set here, before any kernel module is imported, unless a GPU run is asked
  for (BATCH_INVARIANT_TEST_DEVICE=cuda): Triton kernels then run on CPU tensors.
* pytest runs with --import-mode=importlib (pyproject.toml), so the repository root is never on
  sys.path and the folder triton_kernels/ cannot shadow the `triton_kernels` package vLLM probes.
* `backend` fixtures are parametrised over every backend and skip, with the reason, when a
  backend has no kernel for the op here (decided at run time from the registry). Under the
  interpreter the Triton backend is tested by tests/triton/ at interpreter-sized shapes (the
  shared files' shapes are sized for compiled kernels), with the same property functions
  (batch_invariant.testing); on a GPU (BATCH_INVARIANT_TEST_DEVICE=cuda) tests/triton/ runs
  them at GPU sizes on CUDA tensors.
* Under the interpreter, `tl.dot` is patched for the whole session (test-only, reversible):
  bf16 widened to fp32 and k summed in a fixed order (triton_kernels/interpreter.py).
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


@pytest.fixture(scope="session", autouse=True)
def _interpreter_exact_dot():
    """Test-only: the interpreter's tl.dot gets bf16 wrong and sums in a shape-dependent order."""
    if not backends.triton_interpreting() or backends.backend_unavailable_reason("triton", "cpu") is not None:
        yield
        return
    from batch_invariant.triton_kernels.interpreter import exact_dot

    with exact_dot():
        yield


@pytest.fixture(params=backends.BACKEND_NAMES)
def backend(request):
    """Runs the test under each backend; skips a backend that cannot run here."""
    name = request.param
    reason = backends.backend_unavailable_reason(name, selected_device().type)
    if reason is not None:
        pytest.skip(f"backend {name}: {reason}")
    if name == "triton" and selected_device().type == "cpu":
        pytest.skip("backend triton under the interpreter: tests/triton/ runs this suite at interpreter-sized shapes")
    bi.set_backend(name)
    yield name
    bi.set_backend(None)


@pytest.fixture
def triton_device():
    """For tests/triton/: selects the triton backend and yields the device its tensors go on
    (CUDA with BATCH_INVARIANT_TEST_DEVICE=cuda, else CPU under the interpreter)."""
    device = selected_device()
    reason = backends.backend_unavailable_reason("triton", device.type)
    if reason is not None:
        pytest.skip(f"backend triton: {reason}")
    bi.set_backend("triton")
    yield device
    bi.set_backend(None)


def interpreted(device: torch.device) -> bool:
    """True when Triton kernels run in the (slow) interpreter: tests use small shapes then."""
    return device.type == "cpu"


def require_kernel(backend_name: str, op: str) -> None:
    if not backends.has_kernel(backend_name, op):
        pytest.skip(f"backend {backend_name} has no {op} kernel built here")


@pytest.fixture
def require():
    return require_kernel
