"""CUDA GEMM (linear / bmm_nt, csrc/cuda/kernels/linear.cuh) run on the CPU SIMT simulator: the
mma.sync path (bf16 / fp16: cp.async + ldmatrix + m16n8k16 fragments, emulated) and the fp32 SIMT
fma path. Correctness vs the float64 reference within stated bounds, bias / fp32 output (one
rounding), bitwise row invariance (M sweep, rows in a second M tile), N invariance, strided and
misaligned operands (the element-wise load path gives the cp.async path's bits), bmm == per-batch
linear, determinism under both fiber schedules, a negative control, the contract's BLOCK_K, and
an nvcc compile / PTX check of the kernels for sm_80 and sm_90a.

The simulator's mma is a fixed-order scalar routine (csrc/cuda/sim/sim_mma.h), not the tensor
core's internal rounding: these tests check the kernels' logic (indexing, masking, tails, tile
boundaries, K order), and bits are compared only between simulator runs."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from batch_invariant import contract, cuda_sim
from batch_invariant import testing as T
from batch_invariant.ops import linear as linear_mod
from batch_invariant.ops.linear import linear_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
U32 = 2.0 ** -24  # fp32 unit roundoff
BATCHES = (1, 2, 3, 7, 16, 17, 33)
# (M, N, K): single row / single k16 step; K tail (200 = 3 * 64 + 8) with N tail; K not a multiple
# of 8 (element-wise load path) with M / N tails; two N tiles (136 > 128); two M tiles (130 > 128).
SHAPES = ((1, 8, 16), (5, 96, 200), (17, 33, 71), (3, 136, 64), (130, 24, 72))


_rand = cuda_sim.randn
_unit_roundoff = cuda_sim.UNIT_ROUNDOFF.__getitem__


def _rounding_steps(dtype, K: int) -> int:
    """fp32 roundings on one element's accumulation path: one per k16 MMA (the simulator's
    routine sums a k16 step exactly and rounds once when adding it to the accumulator) for
    bf16 / fp16, one per fma for fp32; +1 for the bias addition."""
    return (math.ceil(K / 16) if dtype != torch.float32 else K) + 1


def _assert_close_to_ref(got, x, w, b, out_dtype):
    """|got - ref| <= u_out * (|ref| + e) + e with e = 1.01 * steps * u32 * (|x| @ |w|^T + |b|):
    the fp32 accumulation error (each rounding at most u32 times the running magnitude, bounded by
    the sum of |products|), then one rounding to the output dtype (u_out; 0 for fp32)."""
    ref = linear_ref(x, w, b, torch.float64)
    mag = x.double().abs() @ w.double().abs().T
    if b is not None:
        mag = mag + b.double().abs()
    e = 1.01 * _rounding_steps(x.dtype, x.size(1)) * U32 * mag + 1e-30
    u_out = 0.0 if out_dtype == torch.float32 else _unit_roundoff(out_dtype)
    tol = u_out * (ref.abs() + e) + e
    err = (got.double() - ref).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), f"{int(bad.sum())} elements out of bound; worst excess {float((err - tol).max()):.3g}"


# ------------------------------------------------------------------------------------------
# Contract constants and tile configuration

@pytest.mark.parametrize("dtype", DTYPES)
def test_block_k_is_the_contract_value(sim, dtype):
    name = str(dtype).removeprefix("torch.")
    assert sim.linear_block_k(dtype) == contract.GPU_MATMUL_BLOCK_K[name]
    bm, bn = sim.linear_block_mn(dtype)
    assert bm % 16 == 0 and bn % 8 == 0


def test_device_module_reports_the_contract_block_k():
    try:
        from batch_invariant import _cuda
    except ImportError as exc:
        pytest.skip(f"CUDA extension not built / not importable here: {exc}")
    for dtype in DTYPES:
        assert _cuda.linear_block_k(dtype) == contract.GPU_MATMUL_BLOCK_K[str(dtype).removeprefix("torch.")]


# ------------------------------------------------------------------------------------------
# Correctness

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_matches_reference(sim, dtype, shape):
    M, N, K = shape
    x, w = _rand((M, K), dtype, 1), _rand((N, K), dtype, 2)
    b = _rand((N,), dtype, 3)
    for bias in (None, b):
        for out_dtype in (dtype, torch.float32):
            got = sim.linear(x, w, bias, out_dtype)
            assert got.shape == (M, N) and got.dtype == out_dtype
            _assert_close_to_ref(got, x, w, bias, out_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_and_output_rounding(sim, dtype):
    """The narrow output is the fp32 output rounded once; a bias in the weight dtype equals the same
    bias passed in fp32 (exact conversion); the bias is added after the full K sum."""
    M, N, K = 9, 40, 136
    x, w = _rand((M, K), dtype, 4), _rand((N, K), dtype, 5)
    b = _rand((N,), dtype, 6, scale=4.0)
    y32 = sim.linear(x, w, b, torch.float32)
    assert T.bits_equal(sim.linear(x, w, b, dtype), y32.to(dtype))
    assert T.bits_equal(sim.linear(x, w, b.float(), torch.float32), y32)
    assert T.bits_equal(y32, sim.linear(x, w, None, torch.float32) + b.float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_k0(sim, dtype):
    w = _rand((12, 0), dtype, 7)
    b = _rand((12,), dtype, 8)
    y = sim.linear(torch.empty(3, 0, dtype=dtype), w, b, torch.float32)
    assert T.bits_equal(y, b.float().expand(3, 12).contiguous())
    assert sim.linear(torch.empty(0, 16, dtype=dtype), _rand((5, 16), dtype, 9)).shape == (0, 5)


# ------------------------------------------------------------------------------------------
# Invariance (bitwise)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", (200, 71), ids=("K200-cp.async", "K71-elementwise"))
def test_row_invariance(sim, dtype, K):
    w = _rand((40, K), dtype, 10)
    failures = T.row_invariance_mismatches(lambda rows: sim.linear(rows, w), lambda m, s: _rand((m, K), dtype, s),
                                           batch_sizes=BATCHES)
    assert not failures, failures


def test_row_invariance_across_m_tiles(sim):
    """M = 130 > BLOCK_M = 128: the last row lives in a second M tile, padded with 126 zero rows."""
    dtype = torch.bfloat16
    w = _rand((24, 72), dtype, 11)
    failures = T.row_invariance_mismatches(lambda rows: sim.linear(rows, w, None, torch.float32),
                                           lambda m, s: _rand((m, 72), dtype, s), batch_sizes=(130,))
    assert not failures, failures


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_invariance(sim, dtype):
    x, w = _rand((13, 200), dtype, 12), _rand((136, 200), dtype, 13)
    blocks = [(0, 1), (0, 8), (5, 37), (64, 96), (90, 136), (127, 129)]
    failures = T.column_block_mismatches(lambda a, b: sim.linear(a, b), x, w, blocks)
    assert not failures, failures


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_and_misaligned_operands_give_the_same_bits(sim, dtype):
    """x with a row stride > K, and x / w starting one element off 16-byte alignment (the
    element-wise load path instead of cp.async): the arithmetic, hence the bits, are the same."""
    M, N, K = 11, 30, 128
    x, w = _rand((M, K), dtype, 14), _rand((N, K), dtype, 15)
    ref = sim.linear(x, w)
    wide = torch.zeros(M, K + 24, dtype=dtype)
    wide[:, 8:8 + K] = x
    assert T.bits_equal(sim.linear(wide[:, 8:8 + K], w), ref)  # row stride K + 24, aligned
    xs = torch.zeros(M * K + 1, dtype=dtype)
    xs[1:] = x.reshape(-1)
    ws = torch.zeros(N * K + 1, dtype=dtype)
    ws[1:] = w.reshape(-1)
    assert T.bits_equal(sim.linear(xs[1:].view(M, K), ws[1:].view(N, K)), ref)  # misaligned


@pytest.mark.parametrize("dtype", DTYPES)
def test_bmm_equals_per_batch_linear(sim, dtype):
    a, b_t = _rand((3, 17, 72), dtype, 16), _rand((3, 40, 72), dtype, 17)
    for out_dtype in (dtype, torch.float32):
        y = sim.bmm_nt(a, b_t, out_dtype)
        assert y.shape == (3, 17, 40) and y.dtype == out_dtype
        for i in range(3):
            assert T.bits_equal(y[i], sim.linear(a[i], b_t[i], None, out_dtype)), f"batch {i}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_under_both_schedules(sim, dtype):
    x, w = _rand((19, 200), dtype, 18), _rand((50, 200), dtype, 19)
    first = sim.linear(x, w)
    assert T.bits_equal(sim.linear(x, w), first)
    with sim.reverse_schedule():
        assert T.bits_equal(sim.linear(x, w), first)
        assert T.bits_equal(sim.bmm_nt(x[None], w[None])[0], first)


def test_negative_control_split_k_is_caught(sim, monkeypatch):
    """testing.batch_variant_linear (a K split for M >= 8, what split-K GEMMs do) built on the
    simulated linear must fail the row-invariance check that the real kernel passes. fp32 operands:
    the variant's output is the fp32 sum itself (with bf16 operands its final rounding to bf16
    hides most of the fp32 differences on a problem this small)."""
    dtype = torch.float32
    w = _rand((40, 200), dtype, 20)
    monkeypatch.setattr(linear_mod, "linear",
                        lambda x, wt, bias=None, out_dtype=None: sim.linear(x, wt, bias, out_dtype))
    make = lambda m, s: _rand((m, 200), dtype, s)  # noqa: E731
    failures = T.row_invariance_mismatches(lambda rows: T.batch_variant_linear(rows, w), make, batch_sizes=BATCHES)
    assert failures, "the split-K variant should not be batch-invariant"
    assert not T.row_invariance_mismatches(lambda rows: sim.linear(rows, w), make, batch_sizes=BATCHES)


# ------------------------------------------------------------------------------------------
# Device compile check (no GPU needed): the same header through nvcc.

_NVCC_CHECK = Path(__file__).with_name("nvcc_check_linear.cu")


def test_linear_kernels_compile_with_nvcc_for_sm80_and_sm90a(nvcc, tmp_path):
    for arch, body in cuda_sim.nvcc_compile(_NVCC_CHECK, tmp_path).items():
        # one instruction family per (dtype, arch): mma.sync m16n8k16 with fp32 accumulators, fed
        # by ldmatrix and cp.async; no wgmma, no TF32, nothing approximate or flushed.
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in body
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in body
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body and "cp.async.cg.shared.global" in body
        assert not re.search(r"wgmma|tf32", body)
        assert cuda_sim.ptx_violations(body) == [], arch
        assert "fma.rn.f32" in body  # the fp32 SIMT path
    # -fmad=false changes nothing: nvcc had nothing to contract.
    assert (cuda_sim.nvcc_ptx(_NVCC_CHECK, "90a", workdir=tmp_path)
            == cuda_sim.nvcc_ptx(_NVCC_CHECK, "90a", fmad=False, workdir=tmp_path)), \
        "the PTX depends on -fmad: some fp32 arithmetic is not explicitly rounded"
