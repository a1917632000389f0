"""Triton row ops (rms_norm, fused_add_rms_norm, silu_and_mul, log_softmax, softmax, mean) through
the public API: correctness vs the float64 references with stated rounding bounds, bitwise row
invariance, strided rows, run-to-run determinism, bit-parity with the CPU backend where the contract
makes it exact, and a negative control. Interpreter-sized on CPU; realistic sizes on CUDA
(BATCH_INVARIANT_TEST_DEVICE=cuda)."""
from __future__ import annotations

import math

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.activation import silu_and_mul_ref
from batch_invariant.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from batch_invariant.ops.softmax import log_softmax_ref, mean_ref, softmax_ref
from batch_invariant.triton_kernels import _launch
from batch_invariant.triton_kernels import norm as triton_norm
from batch_invariant.triton_kernels import softmax as triton_softmax

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EPS = 1e-6
U32 = 2.0 ** -24  # fp32 unit roundoff


def _sizes(device):
    """(rows, widths, invariance batch sizes, invariance width) for the interpreter / a GPU."""
    if device.type == "cpu":  # 9000: the multi-chunk paths (blocks cap at 4096 softmax, 8192 norms)
        return 5, (1, 17, 300, 9000), (2, 5, 16), 300
    return 64, (1, 17, 4096, 5120, 151936), T.BATCH_SIZES, 4096


def _rand(shape, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _unit_roundoff(dtype) -> float:
    return {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[dtype]


def _block(name: str, width: int) -> int:
    """The reduction block the launcher picks (a function of the width only)."""
    return triton_norm.block_for(width) if "rms_norm" in name else _launch.row_block(width)


def _chunks(name: str, width: int) -> int:
    return math.ceil(width / _block(name, width))


def _assert_within(got, exact, dtype, rel32, abs32=0.0):
    """|got - exact| <= u_out*|exact|*(1 + rel32) + rel32*|exact| + abs32 + tiny: a value computed in
    fp32 with relative error rel32 (absolute abs32), then rounded once to `dtype` (unit roundoff
    u_out); tiny = the dtype's subnormal spacing (rounding of tiny results)."""
    exact = exact.double().cpu()
    mag = exact.abs()
    tol = mag * (_unit_roundoff(dtype) * (1 + rel32) + rel32) + abs32 + torch.finfo(dtype).tiny * _unit_roundoff(dtype)
    err = (got.double().cpu() - exact).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), f"{int(bad.sum())} elements out of bound; worst excess {float((err - tol).max()):.3g}"


def _check_op(name, x, w, out_dtype):
    """Runs op `name` and checks it against its float64 reference; returns the output."""
    width = x.size(-1)
    chunks, log_block = _chunks(name, width), math.log2(_block(name, width))
    if name == "rms_norm":
        got = bi.rms_norm(x, w, EPS)
        exact = rms_norm_ref(x.double(), w.double(), EPS)
        # Reason: sum of squares of positive terms in fp32: <= (chunks + log2 BLOCK) u relative;
        # /H, +eps, sqrt, 1/s, two products: <= 8 u more.
        _assert_within(got, exact, x.dtype, (chunks + log_block + 8) * U32)
    elif name == "fused_add_rms_norm":
        res = _rand(x.shape, x.dtype, x.device, seed=width + 7)
        got, new_res = bi.fused_add_rms_norm(x, res, w, EPS)
        _, ref_res = fused_add_rms_norm_ref(x.cpu(), res.cpu(), w.cpu(), EPS)
        assert T.bits_equal(new_res.cpu(), ref_res)  # one rounding of an exact sum: exact
        assert T.bits_equal(got, bi.rms_norm(new_res, w, EPS))  # same kernel arithmetic on z
        _assert_within(got, rms_norm_ref(ref_res.double(), w.double().cpu(), EPS), x.dtype,
                       (chunks + log_block + 8) * U32)
    elif name == "silu_and_mul":
        got = bi.silu_and_mul(x)
        # Reason: exp(-a) in fp32 (tl.exp: ~2 ulp, plus |a| * u from the argument's scaling by
        # log2(e); |a| <= 20 here), then 1 + e, a / (.), * b: 3 u more. 64 u covers it.
        _assert_within(got, silu_and_mul_ref(x.double()), x.dtype, 64 * U32)
    elif name in ("log_softmax", "softmax"):
        got = getattr(bi, name)(x, out_dtype)
        z = x.double()
        spread = float((z.max(-1).values - z.min(-1).values).max())  # max |z - max|
        # exp(z - mx): the rounding of z - mx (u * spread relative to the result), tl.exp's
        # scaling by log2(e) (the same again) and ex2.approx (2 u): (2 * spread + 2) u relative;
        # s adds the sum's (chunks + log2 BLOCK) u.
        rel_s = (2 * spread + 2 + chunks + log_block) * U32
        if name == "log_softmax":
            exact = log_softmax_ref(x, torch.float64)
            # Reason: out = (z - mx) - log(s): u * spread, plus log(s)'s absolute error rel_s, plus
            # its rounding u * log(V) (1 <= s <= V) and log's own ~4 u.
            _assert_within(got, exact, got.dtype, 2 * U32, rel_s + (spread + math.log(width) + 8) * U32)
        else:
            exact = softmax_ref(x, torch.float64)
            # Reason: out = e / s: e's (2 * spread + 2) u, s's rel_s and the division's u, relative.
            _assert_within(got, exact, got.dtype, rel_s + (2 * spread + 8) * U32)
    else:  # mean
        got = bi.mean(x, out_dtype)
        exact = mean_ref(x, torch.float64)
        # Reason: fp32 sum with (chunks + log2 BLOCK + 1) u * sum|z| absolute error, then / V.
        abs32 = ((chunks + log_block + 2) * U32 * x.double().abs().mean(-1)).cpu()
        _assert_within(got, exact, got.dtype, 2 * U32, abs32)
    return got


ROW_OPS = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "log_softmax", "softmax", "mean")


def _inputs(name, rows, width, dtype, device, seed):
    cols = 2 * width if name == "silu_and_mul" else width
    return _rand((rows, cols), dtype, device, seed), _rand((width,), dtype, device, seed=99, scale=1.0) + 1


@pytest.mark.parametrize("name", ROW_OPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_op_matches_float64_and_is_deterministic(triton_device, name, dtype):
    rows, widths, _, _ = _sizes(triton_device)
    out_dtypes = (None, torch.float32) if name in ("log_softmax", "softmax", "mean") else (None,)
    for width in widths:
        if name == "silu_and_mul" and triton_device.type == "cpu" and width > 300:
            continue  # elementwise: no multi-chunk path to cover
        x, w = _inputs(name, rows, width, dtype, triton_device, seed=width)
        for out_dtype in out_dtypes:
            first = _check_op(name, x, w, out_dtype)
            again = _check_op(name, x, w, out_dtype)
            assert T.bits_equal(first, again), f"{name} width {width}: run-to-run difference"


def test_rms_norm_fp32_weight(triton_device):
    x = _rand((4, 300), torch.bfloat16, triton_device, seed=1)
    w = _rand((300,), torch.float32, triton_device, seed=2, scale=0.1) + 1  # not bf16-representable
    got = bi.rms_norm(x, w, 1e-5)
    _assert_within(got, rms_norm_ref(x.double(), w.double(), 1e-5), torch.bfloat16, 32 * U32)


def _row_fn(name, w, out_dtype=None):
    if name == "rms_norm":
        return lambda rows: bi.rms_norm(rows, w, EPS)
    if name == "fused_add_rms_norm":  # both outputs, side by side
        return lambda rows: torch.cat(bi.fused_add_rms_norm(rows, rows.flip(-1), w, EPS), dim=-1)
    if name == "silu_and_mul":
        return bi.silu_and_mul
    op = getattr(bi, name)
    return lambda rows: op(rows, out_dtype)


@pytest.mark.parametrize("name", ROW_OPS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_row_op_batch_invariance(triton_device, name, dtype):
    _, _, batch_sizes, width = _sizes(triton_device)
    _, w = _inputs(name, 1, width, dtype, triton_device, seed=0)
    make = lambda m, seed: _inputs(name, m, width, dtype, triton_device, seed)[0]  # noqa: E731
    fails = T.row_invariance_mismatches(_row_fn(name, w), make, batch_sizes=batch_sizes)
    assert not fails, fails
    rows = make(9, 3)
    assert not T.permutation_mismatches(_row_fn(name, w), rows)


@pytest.mark.parametrize("name", ("rms_norm", "log_softmax"))
def test_multi_chunk_rows_are_invariant(triton_device, name):
    """Rows wider than the block take the chunked loop: still a function of the row only."""
    width = {"rms_norm": 9000, "log_softmax": 4500}[name] if triton_device.type == "cpu" else 151936
    assert _chunks(name, width) > 1
    _, w = _inputs(name, 1, width, torch.float32, triton_device, seed=0)
    make = lambda m, seed: _rand((m, width), torch.float32, triton_device, seed)  # noqa: E731
    fails = T.row_invariance_mismatches(_row_fn(name, w, torch.float32), make, batch_sizes=(2, 5))
    assert not fails, fails


@pytest.mark.parametrize("name", ("rms_norm", "silu_and_mul", "log_softmax", "mean"))
def test_strided_rows(triton_device, name):
    """Rows of a wider buffer (row stride != width) give the same bits as contiguous rows: at an
    offset and stride the launchers copy (misaligned start) and at ones they launch on directly
    (16-byte aligned start, a stride with the width's residue mod 16: the same kernel variant)."""
    width = 300
    x, w = _inputs(name, 6, width, torch.bfloat16, triton_device, seed=5)
    fn = _row_fn(name, w, torch.float32)
    expected = fn(x.contiguous())
    for offset, extra in ((5, 37), (8, 48)):
        wide = torch.zeros(6, x.size(1) + extra, dtype=x.dtype, device=triton_device)
        wide[:, offset:offset + x.size(1)] = x
        view = wide[:, offset:offset + x.size(1)]
        assert view.stride(0) != view.size(1)
        assert T.bits_equal(fn(view), expected), f"offset {offset}, row stride {view.stride(0)}"


def test_fused_residual_bits_match_cpu_backend(triton_device, require):
    """z = round(x + residual) is elementwise with one rounding: the same bits on every backend."""
    require("cpu", "fused_add_rms_norm")
    for dtype in DTYPES:
        x, res = _rand((5, 300), dtype, triton_device, 1), _rand((5, 300), dtype, triton_device, 2)
        w = _rand((300,), dtype, triton_device, 3)
        _, z = bi.fused_add_rms_norm(x, res, w, EPS)
        bi.set_backend("cpu")
        try:
            _, z_cpu = bi.fused_add_rms_norm(x.cpu(), res.cpu(), w.cpu(), EPS)
        finally:
            bi.set_backend("triton")
        assert T.bits_equal(z.cpu(), z_cpu)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on -inf - -inf
def test_special_values(triton_device):
    """-inf logits (masked tokens) get probability 0 / logprob -inf; an all -inf row is NaN (as torch)."""
    x = _rand((3, 40), torch.float32, triton_device, seed=4)
    x[0, :10] = float("-inf")
    x[1, :] = float("-inf")
    lsm, sm = bi.log_softmax(x), bi.softmax(x)
    assert bool(torch.isneginf(lsm[0, :10]).all()) and bool((sm[0, :10] == 0).all())
    assert bool(torch.isnan(lsm[1]).all()) and bool(torch.isnan(sm[1]).all())
    assert abs(float(sm[2].double().sum()) - 1) < 1e-5


def test_launchers_reject_what_they_cannot_handle(triton_device):
    x = _rand((4, 8), torch.float32, triton_device, 0)
    with pytest.raises(TypeError):
        triton_softmax.log_softmax(x.to(torch.int32), torch.float32)
    with pytest.raises(TypeError):
        triton_softmax.softmax(x, torch.float16)  # out_dtype must be x's dtype or fp32
    with pytest.raises(ValueError):
        triton_softmax.mean(x.view(2, 2, 8), torch.float32)
    with pytest.raises(ValueError):
        triton_norm.rms_norm(x.t(), torch.ones(4, device=triton_device), EPS)  # inner dim not contiguous
    with pytest.raises(TypeError):
        triton_norm.rms_norm(x, torch.ones(8, dtype=torch.float16, device=triton_device), EPS)
    with pytest.raises(ValueError):
        triton_norm.fused_add_rms_norm(x, x[:2], torch.ones(8, device=triton_device), EPS)


# ------------------------------------------------------------------------------------------
# Negative control: the same property fails for a deliberately batch-variant variant (the
# reduction block chosen from the number of rows), so the tests above can catch one.

@pytest.mark.parametrize("name", ("rms_norm", "log_softmax", "mean"))
def test_negative_control_batch_variant_block(triton_device, name):
    _, _, _, width = _sizes(triton_device)
    w = _rand((width,), torch.float32, triton_device, seed=9, scale=1.0) + 1

    def run(rows, batch_variant):
        # The variant picks the reduction block from the number of rows: forbidden.
        block = 64 if batch_variant and rows.size(0) > 1 else None
        if name == "rms_norm":
            return triton_norm.rms_norm(rows, w, EPS, _block=block)
        return getattr(triton_softmax, name)(rows, torch.float32, _block=block)

    # A different tree changes the fp32 sum in its last bits, which survive to the output for a
    # fraction of rows only (~1/4 for rms_norm: sqrt and the final rounding absorb the rest), so
    # probe rows are tried until one shows it; 40 probes all missing would be ~(3/4)^40.
    caught = None
    for probe in range(40):
        make = lambda m, seed: _rand((m, width), torch.float32, triton_device, seed + 7919 * probe)  # noqa: E731
        caught = T.row_invariance_mismatches(lambda rows: run(rows, True), make, batch_sizes=(2,))
        if caught:
            assert not T.row_invariance_mismatches(lambda rows: run(rows, False), make, batch_sizes=(2,))
            break
    assert caught, "a batch-dependent reduction block went unnoticed"
