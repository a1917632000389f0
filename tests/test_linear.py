"""linear / matmul / bmm: correctness vs float64, bitwise invariance properties, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.linear import linear_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPES = [(1, 1, 1), (3, 7, 31), (17, 33, 333), (64, 1000, 129), (5, 333, 4097), (129, 64, 1000), (2, 3001, 64)]


def _rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_linear_matches_float64(backend, require, dtype, m, n, k):
    require(backend, "linear")
    x, w = _rand(m, k, dtype=dtype, seed=1), _rand(n, k, dtype=dtype, seed=2, scale=k ** -0.5)
    b = _rand(n, dtype=dtype, seed=3)
    ref = linear_ref(x, w, b)
    got = bi.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n)
    # Reason: both round once to `dtype` and accumulate in fp32; ours may differ from torch's
    # summation order, so allow 2x torch's own error vs the fp64 result, plus one fp32-accumulation
    # slack of K * eps_fp32 * |x||w| for tiny outputs where torch's error happens to be ~0.
    torch_err = T.max_abs_error(F.linear(x, w, b), ref)
    slack = k * 2 ** -23 * float((x.double().abs() @ w.double().abs().T).max())
    assert T.max_abs_error(got, ref) <= 2 * torch_err + slack


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_fp32_out_and_bias_dtypes(backend, require, dtype):
    require(backend, "linear")
    x, w = _rand(9, 333, dtype=dtype, seed=1), _rand(40, 333, dtype=dtype, seed=2, scale=0.05)
    b32 = _rand(40, dtype=torch.float32, seed=3)
    got = bi.linear(x, w, b32, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    # Reason: fp32 output of an fp32 accumulation over K: error ~ K * eps_fp32 * sum|x w|.
    bound = 333 * 2 ** -23 * float((x.double().abs() @ w.double().abs().T).max()) + 1e-6
    assert T.max_abs_error(got, linear_ref(x, w, b32, torch.float32)) <= bound
    # The bf16/fp16 output is the fp32 result rounded once (bias added before the rounding).
    assert T.bits_equal(bi.linear(x, w, b32), got.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(333, 1000), (4097, 64), (64, 129)])
def test_linear_row_invariance(backend, require, dtype, k, n):
    require(backend, "linear")
    w = _rand(n, k, dtype=dtype, seed=7, scale=k ** -0.5)
    fails = T.row_invariance_mismatches(lambda x: bi.linear(x, w), lambda m, s: _rand(m, k, dtype=dtype, seed=s))
    assert not fails, fails[:5]
    assert not T.permutation_mismatches(lambda x: bi.linear(x, w), _rand(77, k, dtype=dtype, seed=9))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_column_blocks(backend, require, dtype):
    """N-invariance: a block of output columns computed alone equals that block of a wider weight."""
    require(backend, "linear")
    x, w = _rand(33, 1000, dtype=dtype, seed=1), _rand(3001, 1000, dtype=dtype, seed=2, scale=0.03)
    blocks = [(0, 1), (5, 6), (0, 16), (1, 17), (100, 333), (2900, 3001), (1234, 2345)]
    assert not T.column_block_mismatches(bi.linear, x, w, blocks)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_thread_count(backend, require, dtype):
    require(backend, "linear")
    if backend != "cpu":
        pytest.skip("thread count is a CPU property")
    x, w = _rand(129, 1000, dtype=dtype, seed=1), _rand(4097, 1000, dtype=dtype, seed=2, scale=0.03)
    assert not T.thread_count_mismatches(lambda: bi.linear(x, w))


def test_linear_layouts(backend, require):
    """Non-contiguous inputs are computed correctly (same bits as contiguous), never wrongly."""
    require(backend, "linear")
    big = _rand(40, 500, dtype=torch.bfloat16, seed=1)
    w = _rand(70, 333, dtype=torch.bfloat16, seed=2, scale=0.05)
    x = big[:, 7:340]  # row stride 500
    expect = bi.linear(x.contiguous(), w)
    assert T.bits_equal(bi.linear(x, w), expect)
    assert T.bits_equal(bi.linear(x.t().contiguous().t(), w), expect)  # column-major x
    assert T.bits_equal(bi.linear(x, w.t().contiguous().t()), expect)  # column-major weight
    x3 = x.contiguous().view(4, 10, 333)
    assert T.bits_equal(bi.linear(x3, w), expect.view(4, 10, 70))


def test_matmul_and_bmm(backend, require):
    require(backend, "linear")
    a, b = _rand(20, 333, dtype=torch.float32, seed=1), _rand(333, 50, dtype=torch.float32, seed=2)
    assert T.bits_equal(bi.matmul(a, b), bi.linear(a, b.t().contiguous()))
    require(backend, "bmm_nt")
    a3, b3 = _rand(3, 20, 64, dtype=torch.bfloat16, seed=3), _rand(3, 64, 17, dtype=torch.bfloat16, seed=4)
    got = bi.bmm(a3, b3)
    for i in range(3):
        assert T.bits_equal(got[i], bi.matmul(a3[i], b3[i]))


def test_negative_control_catches_batch_variant_matmul(backend, require):
    """Proof that the property can fail: an M-dependent K split is detected on any machine."""
    require(backend, "linear")
    w = _rand(64, 1000, dtype=torch.float32, seed=7, scale=0.03)
    fails = T.row_invariance_mismatches(lambda x: T.batch_variant_linear(x, w),
                                        lambda m, s: _rand(m, 1000, dtype=torch.float32, seed=s))
    assert fails, "the invariance property did not catch an M-dependent K split"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_report_torch_native_linear_variance(dtype, record_property):
    """Reports (does not assert) whether torch's own F.linear is batch-variant on this machine."""
    w = _rand(2048, 1024, dtype=dtype, seed=7, scale=0.03)
    fails = T.row_invariance_mismatches(lambda x: F.linear(x, w), lambda m, s: _rand(m, 1024, dtype=dtype, seed=s),
                                        batch_sizes=(1, 16, 64, 128))
    record_property("torch_linear_variant_cases", len(fails))
    print(f"torch F.linear {dtype}: {len(fails)} batch-variant cases of 18 ({'variant' if fails else 'invariant'})")
    assert isinstance(fails, list)


def test_linear_bad_input():
    x = torch.randn(4, 8)
    w = torch.randn(5, 8)
    with pytest.raises(TypeError, match="dtype"):
        bi.linear(x.int(), w.int())
    with pytest.raises(TypeError, match="float64"):
        bi.linear(x, w.double())
    with pytest.raises(TypeError, match="dtype of x"):
        bi.linear(x, w.bfloat16())
    with pytest.raises(TypeError, match="dtype"):
        bi.linear(x.bfloat16(), w)
    with pytest.raises(ValueError, match=r"x's last dim.*\(4, 8\)"):
        bi.linear(x, torch.randn(5, 9))
    with pytest.raises(ValueError, match="2-d"):
        bi.linear(x, torch.randn(8))
    with pytest.raises(ValueError, match="elements"):
        bi.linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="device"):
        bi.linear(x, w.to("meta"))
    with pytest.raises(TypeError, match="out_dtype"):
        bi.linear(x, w, out_dtype=torch.float16)
    with pytest.raises(TypeError, match="Tensor"):
        bi.linear([1.0], w)
    with pytest.raises(ValueError, match=r"a \[M, K\] and b \[K, N\]"):
        bi.matmul(x, torch.randn(5, 3))
