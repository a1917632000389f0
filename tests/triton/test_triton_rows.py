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
from batch_invariant import backends
from batch_invariant import testing as T
from batch_invariant.ops.activation import silu_and_mul_ref
from batch_invariant.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from batch_invariant.ops.softmax import log_softmax_ref, mean_ref, softmax_ref
from batch_invariant.triton_kernels import _launch, interpreter
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


# ------------------------------------------------------------------------------------------
# Layout: a view that starts off a 16-byte boundary, or has a row stride of another residue mod 16,
# would make Triton compile another kernel variant (other load vector width -> other register
# layout -> another tl.sum tree). The launchers copy such views (_launch.canonical_layout).

def _misaligned_views(t):
    """Two copies of t that start at element 1 of a bigger buffer (not 16-byte aligned): one with
    contiguous strides, one inside rows one element wider (leading strides of another residue
    mod 16 when the width is a multiple of 16)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    wide = torch.empty(t.shape[:-1] + (t.size(-1) + 1,), dtype=t.dtype, device=t.device)[..., 1:]
    return flat.copy_(t), wide.copy_(t)


def _launch_keys(monkeypatch, module, kernel_name):
    """Records, for each launch of ``module.<kernel_name>``, what Triton specialises the kernel on
    beyond types and constexprs: each tensor's 16-byte alignment, each int's divisibility by 16
    and equality with 1. Equal keys = the same compiled variant."""
    keys, kernel = [], getattr(module, kernel_name)

    def key(a):
        if isinstance(a, torch.Tensor):
            return a.data_ptr() % 16 == 0
        if isinstance(a, int) and not isinstance(a, bool):
            return a % 16 == 0, a == 1
        return None

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                keys.append(tuple(key(a) for a in args))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, kernel_name, Spy())
    return keys


LAYOUT_OPS = ("rms_norm", "fused_add_rms_norm", "log_softmax", "softmax", "mean")


def _layout_case(name, device, dtype):
    """(run(x, residual, weight), kernel module, kernel name, x, residual, weight) of a reducing row op."""
    rows, width = (3, 256) if device.type == "cpu" else (16, 4096)  # widths divisible by 16
    x, w = _inputs(name, rows, width, dtype, device, seed=11)
    res = _rand(x.shape, dtype, device, seed=12)
    if "rms_norm" in name:
        run = (lambda x, r, w: bi.rms_norm(x, w, EPS)) if name == "rms_norm" else (
            lambda x, r, w: torch.cat(bi.fused_add_rms_norm(x, r, w, EPS), dim=-1))
        return run, triton_norm, "_rms_norm_kernel", x, res, w
    return (lambda x, r, w: getattr(bi, name)(x, torch.float32)), triton_softmax, "_softmax_family_kernel", x, res, w


@pytest.mark.parametrize("name", LAYOUT_OPS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_misaligned_rows_give_the_bits_of_fresh_rows(triton_device, monkeypatch, name, dtype):
    """Rows of a view starting at element 1 of a bigger buffer (both views of _misaligned_views)
    give the bits of the same rows in fresh tensors, and every launch gets the specialisation key
    of a fresh tensor. On a GPU the bits check the reduction tree itself; in the interpreter
    (where layouts do not exist) the keys check the launcher's plumbing."""
    run, module, kernel_name, x, res, w = _layout_case(name, triton_device, dtype)
    keys = _launch_keys(monkeypatch, module, kernel_name)
    for xv, rv, wv in zip(_misaligned_views(x), _misaligned_views(res), _misaligned_views(w)):
        assert not any(_launch.has_canonical_layout(t) for t in (xv, rv, wv))
        got = run(xv, rv, wv)
        for r in range(x.size(0)):
            assert T.bits_equal(got[r:r + 1], run(x[r:r + 1].clone(), res[r:r + 1].clone(), w.clone())), \
                f"{name} {dtype}: row {r} of a misaligned view (strides {xv.stride()})"
    assert len(set(keys)) == 1, f"{name}: the launches compiled {len(set(keys))} kernel variants"


def test_negative_control_uncanonicalised_views_change_the_kernel_variant(triton_device, monkeypatch):
    """Without _launch.canonical_layout the same misaligned views reach the kernel with another
    specialisation key (another compiled variant), which the key check above catches."""
    run, module, kernel_name, x, res, w = _layout_case("rms_norm", triton_device, torch.float32)
    keys = _launch_keys(monkeypatch, module, kernel_name)
    monkeypatch.setattr(_launch, "canonical_layout", lambda t: t)
    run(x, res, w)
    for xv, rv, wv in zip(_misaligned_views(x), _misaligned_views(res), _misaligned_views(w)):
        run(xv, rv, wv)
    assert len(set(keys)) == 3 and all(k != keys[0] for k in keys[1:])


# ------------------------------------------------------------------------------------------
# bf16 rounding: the kernels use the plain casts the GPU runs (.to(tl.float32), .to(tl.bfloat16));
# in the interpreter these pin the test patch of its casts (round to nearest even, subnormals).

def _bf16(*bits):
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: the norm of inf rows
def test_bf16_rounding_edge_cases(triton_device):
    """z = round_bf16(x + residual) with an exact fp32 sum: ties to even (down, up, carrying into
    the exponent, overflowing to inf), just above / below a tie, subnormals (widened and rounded
    exactly), signed zeros, infinities: the bits torch's round-to-nearest-even gives."""
    one, one_up, below_two, bf16_max, tiny = 0x3F80, 0x3F81, 0x3FFF, 0x7F7F, 0x0001
    pairs = [
        (one, 0x3B80),            # 1 + 2^-8: a tie, rounds down to the even 1.0
        (one_up, 0x3B80),         # 1.0078125 + 2^-8: a tie, rounds up to the even 1.015625
        (below_two, 0x3B80),      # 1.9921875 + 2^-8: a tie, carries into the exponent (2.0)
        (one, 0x3BC0),            # 1 + 1.5 * 2^-8: above the tie, up
        (one, 0x3B00),            # 1 + 2^-9: below the tie, down
        (0xBF81, 0xBB80),         # the negative tie, up in magnitude
        (bf16_max, 0x7B00),       # max + half an ulp: a tie, rounds to even = inf
        (bf16_max | 0x8000, 0xFB00),  # and to -inf
        (bf16_max, 0x7A80),       # max + a quarter ulp: stays max
        (tiny, 0x0000),           # the smallest subnormal, unchanged
        (tiny, tiny),             # subnormal + subnormal, exact
        (0x007F, tiny),           # the largest subnormal + the smallest: the smallest normal
        (0x0003, 0x8001),         # subnormal - subnormal
        (tiny, 0x8001),           # x - x = +0
        (0x8000, 0x8000),         # -0 + -0 = -0
        (0x7F80, one),            # inf + 1 = inf
    ]
    x = _bf16(*(a for a, _ in pairs)).view(1, -1).to(triton_device)
    res = _bf16(*(b for _, b in pairs)).view(1, -1).to(triton_device)
    w = torch.ones(x.size(1), dtype=torch.bfloat16, device=triton_device)
    _, z = bi.fused_add_rms_norm(x, res, w, EPS)
    expected = (x.cpu().float() + res.cpu().float()).to(torch.bfloat16)  # torch: round to nearest even
    assert expected.view(torch.int16)[0, 2].item() == 0x4000 and torch.isinf(expected[0, 6])  # the cases' intent
    assert T.bits_equal(z.cpu(), expected), (z.cpu().view(torch.int16), expected.view(torch.int16))


def test_interpreter_without_exact_casts_fails_closed(triton_device, monkeypatch):
    """Without the test patch the interpreter truncates fp32 -> bf16: bf16 launches on CPU tensors
    refuse to run rather than give other bits than the GPU (fp32 ones run)."""
    if triton_device.type != "cpu":
        pytest.skip("the cast patch concerns the Triton interpreter (CPU tensors) only")
    monkeypatch.setattr(interpreter, "is_active", lambda: False)
    x = _rand((2, 32), torch.bfloat16, triton_device, 0)
    w = torch.ones(32, dtype=torch.bfloat16, device=triton_device)
    for call in (lambda: triton_norm.rms_norm(x, w, EPS), lambda: triton_norm.fused_add_rms_norm(x, x, w, EPS),
                 lambda: triton_softmax.softmax(x, torch.float32)):
        with pytest.raises(backends.BackendUnavailableError, match="exact_dot"):
            call()
    assert triton_norm.rms_norm(x.float(), w.float(), EPS).dtype == torch.float32


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
