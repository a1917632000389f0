"""bi.batch_invariant_mode(): reversible, re-entrant aten overrides for third-party torch code."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import batch_invariant as bi
from batch_invariant import testing as T


@pytest.fixture(autouse=True)
def _cpu_kernels(require):
    require("cpu", "linear")
    require("cpu", "softmax")


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_mode_routes_mm_addmm_bmm_softmax_mean():
    x, w, b = _rand(9, 333, seed=1), _rand(50, 333, seed=2), _rand(50, seed=3)
    with bi.batch_invariant_mode():
        assert T.bits_equal(x @ w.T, bi.linear(x, w))
        assert T.bits_equal(F.linear(x, w, b), bi.linear(x, w, b))
        assert T.bits_equal(torch.addmm(b, x, w.T, beta=0.5, alpha=2.0),
                            (2.0 * bi.linear(x, w, out_dtype=torch.float32) + 0.5 * b))
        a3, b3 = _rand(2, 5, 64, seed=4), _rand(2, 64, 7, seed=5)
        assert T.bits_equal(torch.bmm(a3, b3), bi.bmm(a3, b3))
        assert T.bits_equal(torch.softmax(x, 0), bi.softmax(x.t()).t())
        assert T.bits_equal(torch.log_softmax(x.bfloat16(), -1, dtype=torch.float32), bi.log_softmax(x.bfloat16()))
        assert T.bits_equal(x.mean(-1), bi.mean(x))
        assert T.bits_equal(x.view(9, 9, 37).mean((0, 2), keepdim=True).flatten(),
                            bi.mean(x.view(9, 9, 37).permute(1, 0, 2).reshape(9, -1)))
    assert not bi.is_enabled()


def test_mode_makes_torch_linear_row_invariant():
    w = _rand(2048, 1024, dtype=torch.bfloat16, seed=7) * 0.03
    with bi.batch_invariant_mode():
        fails = T.row_invariance_mismatches(lambda x: F.linear(x, w), lambda m, s: _rand(m, 1024, dtype=torch.bfloat16, seed=s),
                                            batch_sizes=(1, 2, 16, 64, 129))
    assert not fails


def test_mode_is_reentrant_reversible_and_exception_safe():
    x, w = _rand(4, 64, seed=1), _rand(8, 64, seed=2)
    native = x @ w.T
    with bi.batch_invariant_mode():
        with bi.batch_invariant_mode():
            assert bi.is_enabled()
        assert bi.is_enabled(), "leaving the inner context must keep the outer one active"
        with pytest.raises(ZeroDivisionError):
            with bi.batch_invariant_mode():
                1 / 0
        assert bi.is_enabled()
    assert not bi.is_enabled()
    assert torch.equal(x @ w.T, native), "overrides must be gone after the last exit"
    with pytest.raises(RuntimeError, match="without a matching"):
        bi.disable()
    bi.enable()
    bi.disable()
    assert not bi.is_enabled()


def test_mode_gradients_flow_and_are_correct():
    x = _rand(5, 32, seed=1).requires_grad_()
    w = _rand(7, 32, seed=2).requires_grad_()
    with bi.batch_invariant_mode():
        loss = torch.log_softmax(F.linear(x, w), -1).mean()
        loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.log_softmax(F.linear(x64, w64), -1).mean().backward()
    # Reason: fp32 forward/backward of a 32-wide problem: ~1e-6 relative to the fp64 gradients.
    assert torch.allclose(gx.double(), x64.grad, atol=1e-6, rtol=1e-5)
    assert torch.allclose(gw.double(), w64.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_mode_under_no_grad_and_inference_mode(ctx):
    x, w = _rand(3, 64, seed=1), _rand(5, 64, seed=2)
    with ctx(), bi.batch_invariant_mode():
        assert T.bits_equal(F.linear(x, w), bi.linear(x, w))


def test_mode_fails_closed_on_unsupported_dtype():
    with bi.batch_invariant_mode():
        with pytest.raises(NotImplementedError, match="float64"):
            torch.randn(3, 3, dtype=torch.float64) @ torch.randn(3, 3, dtype=torch.float64)


def test_mode_thread_safe_counting():
    errors = []

    def work():
        try:
            for _ in range(20):
                with bi.batch_invariant_mode():
                    pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not bi.is_enabled()
