"""Fixtures of the CUDA simulator tests (tests/cuda/test_cuda_sim_*.py)."""
from __future__ import annotations

import pytest

from batch_invariant import cuda_sim, nvcc_check


@pytest.fixture(scope="session")
def sim():
    """batch_invariant.cuda_sim with its module built; skips only when a tool or header is missing
    (a compile error in the sources fails here, never a skip)."""
    reason = cuda_sim.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA simulator cannot be built here: {reason}")
    cuda_sim.load()
    return cuda_sim


@pytest.fixture
def nvcc():
    """The nvcc on PATH (the device compile checks skip without one)."""
    exe = nvcc_check.nvcc()
    if exe is None:
        pytest.skip("nvcc not on PATH")
    return exe
