"""Row-wise ops (rms_norm, fused_add_rms_norm, silu_and_mul, log_softmax, softmax, mean):
correctness vs float64, bitwise row invariance, thread count, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.activation import silu_and_mul_ref
from batch_invariant.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from batch_invariant.ops.softmax import log_softmax_ref, mean_ref, softmax_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
WIDTHS = (1, 15, 16, 17, 333, 1000, 3001, 4097)


def _rand(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _ulp(dtype) -> float:
    return {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -24}[dtype]


def _within_rounding(got, ref64, dtype, extra_rel=64 * 2 ** -24):
    """|got - ref| <= one output ulp (the final rounding, relative) + fp32 math slack; the absolute
    floor is half the subnormal spacing of the output dtype (rounding of tiny results)."""
    tol = ref64.abs() * (2 * _ulp(dtype) + extra_rel) + torch.finfo(dtype).tiny * _ulp(dtype)
    return bool(((got.double() - ref64).abs() <= tol).all())


# (name, op, reference-in-float64, kernel name)
CASES = {
    "rms_norm": (lambda x, w: bi.rms_norm(x, w, 1e-6), lambda x, w: rms_norm_ref(x.double(), w.double(), 1e-6), "rms_norm"),
    "silu_and_mul": (lambda x, w: bi.silu_and_mul(x), lambda x, w: silu_and_mul_ref(x.double()), "silu_and_mul"),
    "log_softmax": (lambda x, w: bi.log_softmax(x), lambda x, w: log_softmax_ref(x, torch.float64), "log_softmax"),
    "softmax": (lambda x, w: bi.softmax(x), lambda x, w: softmax_ref(x, torch.float64), "softmax"),
    "mean": (lambda x, w: bi.mean(x), lambda x, w: mean_ref(x, torch.float64), "mean"),
}


def _inputs(name, rows, width, dtype, seed):
    cols = 2 * width if name == "silu_and_mul" else width
    return _rand(rows, cols, dtype=dtype, seed=seed, scale=3.0), _rand(width, dtype=dtype, seed=99) + 1


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_row_op_matches_float64(backend, require, name, dtype, width):
    op, ref, kernel = CASES[name]
    require(backend, kernel)
    x, w = _inputs(name, 5, width, dtype, seed=width)
    got = op(x, w)
    r = ref(x, w)
    if name == "log_softmax":
        # Reason: fp32 result of (z - max) - log(sum); error ~ few fp32 ulps of |max| + log(V).
        assert T.max_abs_error(got, r) <= 16 * 2 ** -24 * (float(x.float().abs().max()) + 10)
    elif name == "mean":
        # Reason: fp32 sum of `width` terms then one rounding: width * eps_fp32 * mean|x| + 1 ulp.
        tol = 2 * _ulp(dtype) * r.abs() + width * 2 ** -24 * x.double().abs().mean(-1) + 1e-30
        assert bool(((got.double() - r).abs() <= tol).all())
    else:
        assert _within_rounding(got, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(backend, require, dtype):
    require(backend, "fused_add_rms_norm")
    x, res = _rand(9, 1000, dtype=dtype, seed=1), _rand(9, 1000, dtype=dtype, seed=2)
    w = _rand(1000, dtype=dtype, seed=3)
    out, new_res = bi.fused_add_rms_norm(x, res, w, 1e-5)
    assert T.bits_equal(new_res, (x.double() + res.double()).to(dtype))  # one rounding of an exact sum
    assert T.bits_equal(out, bi.rms_norm(new_res, w, 1e-5))
    ref_out, _ = fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert _within_rounding(out, rms_norm_ref(new_res.double(), w.double(), 1e-5), dtype)
    assert ref_out.shape == out.shape


def test_rms_norm_fp32_weight(backend, require):
    require(backend, "rms_norm")
    x, w = _rand(4, 333, dtype=torch.bfloat16, seed=1), _rand(333, dtype=torch.float32, seed=2)
    assert _within_rounding(bi.rms_norm(x, w, 1e-6), rms_norm_ref(x.double(), w.double(), 1e-6), torch.bfloat16)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", (17, 4097))
def test_row_op_invariance(backend, require, name, dtype, width):
    op, _, kernel = CASES[name]
    require(backend, kernel)
    w = _inputs(name, 1, width, dtype, 0)[1]
    fails = T.row_invariance_mismatches(lambda x: op(x, w), lambda m, s: _inputs(name, m, width, dtype, s)[0])
    assert not fails, fails[:5]
    assert not T.permutation_mismatches(lambda x: op(x, w), _inputs(name, 50, width, dtype, 5)[0])
    if backend == "cpu":
        x = _inputs(name, 300, width, dtype, 6)[0]
        assert not T.thread_count_mismatches(lambda: op(x, w))


@pytest.mark.parametrize("name", ["rms_norm", "log_softmax"])
def test_row_op_strided_rows(backend, require, name):
    op, _, kernel = CASES[name]
    require(backend, kernel)
    big = _rand(6, 1200, dtype=torch.bfloat16, seed=1)
    x, w = big[:, 100:1100], _rand(1000, dtype=torch.bfloat16, seed=2)
    assert T.bits_equal(op(x, w), op(x.contiguous(), w))
    assert T.bits_equal(op(x.contiguous().view(2, 3, 1000), w).view(6, -1), op(x.contiguous(), w))


def test_log_softmax_special_values(backend, require):
    require(backend, "log_softmax")
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3, [1e30, -1e30, 0.0]])
    got = bi.log_softmax(x)
    ref = torch.log_softmax(x, -1)
    assert torch.isneginf(got[0, 1]) and torch.isnan(got[1]).all() == torch.isnan(ref[1]).all()
    assert torch.allclose(got[2], ref[2])


def test_report_torch_native_row_variance():
    """Reported, not asserted: torch's own row reductions on this machine."""
    x = _rand(64, 4096, dtype=torch.bfloat16, seed=1)
    w = torch.ones(4096, dtype=torch.bfloat16)
    for name, fn in {"F.rms_norm": lambda t: F.rms_norm(t, (4096,), w, 1e-6),
                     "log_softmax": lambda t: torch.log_softmax(t.float(), -1)}.items():
        n = len(T.row_invariance_mismatches(fn, lambda m, s: _rand(m, 4096, dtype=torch.bfloat16, seed=s), (1, 16, 64)))
        print(f"torch {name}: {n} batch-variant cases")
        assert n >= 0


def test_row_ops_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight"):
        bi.rms_norm(x, torch.ones(7))
    with pytest.raises(TypeError, match="dtype"):
        bi.rms_norm(x, torch.ones(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype"):
        bi.rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="eps"):
        bi.rms_norm(x, torch.ones(8), -1.0)
    with pytest.raises(ValueError, match="shape of x"):
        bi.fused_add_rms_norm(x, torch.randn(4, 7), torch.ones(8))
    with pytest.raises(TypeError, match="dtype"):
        bi.fused_add_rms_norm(x, torch.randn(4, 8).bfloat16(), torch.ones(8))
    with pytest.raises(ValueError, match="even"):
        bi.silu_and_mul(torch.randn(3, 7))
    with pytest.raises(TypeError, match="out_dtype"):
        bi.log_softmax(x.bfloat16(), out_dtype=torch.float16)
    with pytest.raises(ValueError, match="device"):
        bi.rms_norm(x, torch.ones(8, device="meta"))


def _batch_variant_rms_norm(x, w):
    """Deliberately batch-variant: once T >= 8 the sum of squares is split in two halves whose
    partial sums are stored in bf16 (what a kernel that picks a split-reduction with low-precision
    partials for large batches does)."""
    if x.size(0) < 8:
        return bi.rms_norm(x, w, 1e-6)
    z = x.float()
    half = z.size(1) // 2
    parts = [bi.mean(p * p, torch.float32) * p.size(1) for p in (z[:, :half], z[:, half:])]
    ss = parts[0].bfloat16().float() + parts[1].bfloat16().float()
    return (z * torch.rsqrt(ss / z.size(1) + 1e-6).unsqueeze(1) * w.float()).to(x.dtype)


def test_negative_control_catches_batch_variant_norm(backend, require):
    """Proof that the row property can fail: a T-dependent reduction split is detected."""
    require(backend, "rms_norm")
    w = _rand(1000, dtype=torch.float32, seed=1)
    fails = T.row_invariance_mismatches(lambda x: _batch_variant_rms_norm(x, w),
                                        lambda m, s: _rand(m, 1000, dtype=torch.float32, seed=s))
    assert fails, "the row-invariance property did not catch a T-dependent reduction split"
