"""CUDA GEMM (linear / bmm_nt, csrc/cuda/kernels/linear.cuh) run on the CPU SIMT simulator: the
mma.sync path (bf16 / fp16: cp.async + ldmatrix + m16n8k16 fragments, emulated) and the fp32 SIMT
fma path. Correctness vs the float64 reference within stated bounds, bias / fp32 output (one
rounding), bitwise row invariance (M sweep, rows in a second M tile), N invariance, strided and
misaligned operands (the element-wise load path gives the cp.async path's bits), bmm == per-batch
linear, determinism under both fiber schedules, a negative control, the contract's BLOCK_K, and
an nvcc compile / PTX check of the kernels for sm_80 and sm_90a. K chunks (contract
GPU_MATMUL_K_CHUNK): the fused and split-parallel realisations give the same bits, the result is
the chunked order emulated in torch from the single-chunk results, negative controls for the
combine's order and its -0.0 start, the auto path's rule and row invariance across its switch,
and the BATCH_INVARIANT_CUDA_LINEAR_PATH knob.

The simulator's mma is a fixed-order scalar routine (csrc/cuda/sim/sim_mma.h), not the tensor
core's internal rounding: these tests check the kernels' logic (indexing, masking, tails, tile
boundaries, K order), and bits are compared only between simulator runs."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from batch_invariant import contract, cuda_sim, nvcc_check
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
    bf16 / fp16, one per fma for fp32; one per K chunk added to the total; +1 for the bias."""
    chunks = max(1, math.ceil(K / contract.GPU_MATMUL_K_CHUNK))
    return (math.ceil(K / 16) if dtype != torch.float32 else K) + chunks + 1


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


def test_k_chunk_is_the_contract_value(sim):
    assert sim.linear_k_chunk() == contract.GPU_MATMUL_K_CHUNK
    assert all(contract.GPU_MATMUL_K_CHUNK % bk == 0 for bk in contract.GPU_MATMUL_BLOCK_K.values())


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
    xk, wk = _rand((3, 1030), dtype, 18), _rand((20, 1030), dtype, 19)  # two K chunks: split-parallel
    split = sim.linear(xk, wk, path="split")
    with sim.reverse_schedule():
        assert T.bits_equal(sim.linear(x, w), first)
        assert T.bits_equal(sim.bmm_nt(x[None], w[None])[0], first)
        assert T.bits_equal(sim.linear(xk, wk, path="split"), split)


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
# K chunks: fused == split-parallel, the chunked order, the auto rule (simulator time is per
# block and k-step: few tiles; bf16 / fp16 cost ~7 ms per tile and k-step, fp32 far less)

KC = contract.GPU_MATMUL_K_CHUNK
# one chunk; a short last chunk with its tail inside a BLOCK_K step; two full chunks; three.
CHUNK_KS = (KC, KC + 6, 2 * KC, 2 * KC + 52)


def _both_paths(fn):
    """fn(path) under the forced fused and split paths: returns (fused, split), checking each ran."""
    got = []
    for path in ("fused", "split"):
        got.append(fn(path))
        assert cuda_sim.last_linear_path() == path
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", CHUNK_KS)
def test_fused_and_split_paths_give_the_same_bits(sim, dtype, K):
    M, N = 5, 40
    x, w = _rand((M, K), dtype, 30), _rand((N, K), dtype, 31, K ** -0.5)
    b = _rand((N,), dtype, 32)
    # bf16 / fp16 cost ~0.1 s per call and K chunk: bias with fp32 output, no bias with the model
    # dtype (the other two combinations differ only in the epilogue, covered by the fp32 SIMT path).
    combos = ((b, torch.float32), (None, dtype))
    if dtype == torch.float32:
        combos += ((None, torch.float32), (b, dtype))
    for bias, out_dtype in combos:
        fused, split = _both_paths(lambda p: sim.linear(x, w, bias, out_dtype, path=p))
        assert fused.dtype == out_dtype and T.bits_equal(fused, split), (bias is not None, out_dtype)
        _assert_close_to_ref(fused, x, w, bias, out_dtype)


@pytest.mark.parametrize("dtype,M", [(torch.bfloat16, 130), (torch.float32, 1), (torch.float32, 64),
                                     (torch.float32, 65), (torch.float32, 200)])
def test_fused_and_split_paths_agree_for_m_tails(sim, dtype, M):
    """M = 1, a multiple of the tile, one past it, several tiles with a tail (M = 130 > 128)."""
    K = 2 * KC + 52
    x, w, b = _rand((M, K), dtype, 33), _rand((24, K), dtype, 34, K ** -0.5), _rand((24,), dtype, 35)
    fused, split = _both_paths(lambda p: sim.linear(x, w, b, torch.float32, path=p))
    assert T.bits_equal(fused, split)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_bmm_paths_agree_and_equal_per_batch_linear(sim, dtype):
    a, b_t = _rand((3, 17, KC + 6), dtype, 36), _rand((3, 40, KC + 6), dtype, 37)
    fused, split = _both_paths(lambda p: sim.bmm_nt(a, b_t, dtype, path=p))
    assert T.bits_equal(fused, split)
    for i in range(3):
        assert T.bits_equal(fused[i], sim.linear(a[i], b_t[i], None, dtype, path="split")), f"batch {i}"


def _chunked(chunk_sums, bias, out_dtype, *, start=-0.0, reverse=False):
    """The contract's combine in torch (fp32 adds are IEEE round-to-nearest-even, as add_rn):
    total = start, then + each chunk sum (left to right unless reverse), + bias, one rounding."""
    total = torch.full_like(chunk_sums[0], start)
    for s in (reversed(chunk_sums) if reverse else chunk_sums):
        total = total + s
    if bias is not None:
        total = total + bias.float()
    return total.to(out_dtype)


def _single_chunk_sums(sim, x, w):
    """Each chunk's sum from +0: the kernel on that chunk's columns alone (K <= K_CHUNK: one chunk,
    and -0 + s == s), fp32 output, no bias."""
    K = x.size(1)
    return [sim.linear(x[:, k0:k0 + KC], w[:, k0:k0 + KC], None, torch.float32) for k0 in range(0, K, KC)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_result_is_the_chunked_order(sim, dtype):
    """Both paths equal the chunk sums (each computed as a K <= K_CHUNK launch) combined in torch
    from -0.0 left to right, then the bias, one rounding: exact emulation, bitwise."""
    K = 2 * KC + 52
    x, w, b = _rand((6, K), dtype, 38), _rand((20, K), dtype, 39, K ** -0.5), _rand((20,), dtype, 40)
    want = _chunked(_single_chunk_sums(sim, x, w), b, dtype)
    for path in ("fused", "split"):
        assert T.bits_equal(sim.linear(x, w, b, dtype, path=path), want), path


def _planted(dtype, K, entries):
    """x [1, K], w [1, K] zero except x[k] = a, w[k] = b for (k, a, b) in entries."""
    x, w = torch.zeros(1, K, dtype=dtype), torch.zeros(1, K, dtype=dtype)
    for k, a, b in entries:
        x[0, k], w[0, k] = a, b
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunks_are_summed_separately(sim, dtype):
    """x.w = 2^25 (chunk 0) + four 1s (chunk 1, each in its own k16 step): one accumulator over all
    of K loses every 1 (2^25 + 1 rounds back to 2^25 in fp32); the chunked order sums the 1s to 4
    first, and 2^25 + 4 is exact. Exact expected value, both paths."""
    x, w = _planted(dtype, KC + 64, [(0, 2.0 ** 12, 2.0 ** 13)] + [(KC + 16 * i, 1.0, 1.0) for i in range(4)])
    for path in ("fused", "split"):
        assert sim.linear(x, w, None, torch.float32, path=path).item() == 2.0 ** 25 + 4, path


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_control_combine_order(sim, dtype):
    """Chunk sums 1, 2^25, -2^25: left to right (1 + 2^25 rounds to 2^25) gives 0, right to left
    gives 1. The kernel matches the torch emulation of the contract's order, and the emulation of
    the reversed order is told apart (the emulation check can fail)."""
    x, w = _planted(dtype, 2 * KC + 8, [(0, 1.0, 1.0), (KC, 2.0 ** 12, 2.0 ** 13), (2 * KC, -(2.0 ** 12), 2.0 ** 13)])
    sums = _single_chunk_sums(sim, x, w)
    assert [s.item() for s in sums] == [1.0, 2.0 ** 25, -(2.0 ** 25)]
    right, wrong = _chunked(sums, None, torch.float32), _chunked(sums, None, torch.float32, reverse=True)
    assert right.item() == 0.0 and wrong.item() == 1.0
    for path in ("fused", "split"):
        got = sim.linear(x, w, None, torch.float32, path=path)
        assert T.bits_equal(got, right) and not T.bits_equal(got, wrong), path


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_negative_control_signed_zero_start(sim, dtype):
    """Products -1e-30 * 1e-30 (and sums of 16 of them, an MMA step) round to -0 in fp32, so every
    chunk sums to -0: the total from -0.0 stays -0.0; a total started from +0.0 would give +0.0
    (bits differ). A zero-valued input gives +0 (+0 chunks; K = 0 is one empty chunk, +0), as the
    single accumulator did."""
    K = KC + 64  # a multiple of BLOCK_K: no zero-filled step tail (its +0 products would give +0)
    x, w = torch.full((1, K), -1e-30, dtype=dtype), torch.full((1, K), 1e-30, dtype=dtype)
    sums = _single_chunk_sums(sim, x, w)
    assert all(s.item() == 0.0 and math.copysign(1.0, s.item()) < 0 for s in sums)
    right, wrong = _chunked(sums, None, torch.float32), _chunked(sums, None, torch.float32, start=0.0)
    assert not T.bits_equal(right, wrong)
    zeros = torch.zeros(1, K, dtype=dtype)
    for path in ("fused", "split"):
        got = sim.linear(x, w, None, torch.float32, path=path)
        assert T.bits_equal(got, right) and not T.bits_equal(got, wrong), path
        assert math.copysign(1.0, sim.linear(zeros, w, None, torch.float32, path=path).item()) > 0, path
        assert math.copysign(1.0, sim.linear(zeros[:, :0], w[:, :0], None, torch.float32, path=path).item()) > 0


def test_plan_rule(sim):
    """Auto: split-parallel iff K has > 1 chunk and output tiles x batches fill at most half the SMs
    (Qwen3-8B-like shapes on 132 SMs); the workspace is [B][chunks][M][N] fp32; forced paths and
    grid limits."""
    bf = torch.bfloat16
    for M in (1, 16, 64, 256):
        for K in (4096, 12288):
            p = sim.linear_plan(bf, M, 4096, K, sm_count=132)
            assert p["path"] == "split" and p["chunks"] == K // KC and p["error"] == "", (M, K)
            assert p["ws_floats"] == p["chunks"] * M * 4096
    assert sim.linear_plan(bf, 64, 4096, 1024, sm_count=132)["path"] == "fused"  # one chunk
    assert sim.linear_plan(bf, 300, 4096, 4096, sm_count=132)["path"] == "fused"  # 96 tiles > 132 / 2
    assert sim.linear_plan(bf, 600, 4096, 4096, sm_count=132)["path"] == "fused"  # 160 tiles
    assert sim.linear_plan(bf, 1, 151936, 4096, sm_count=132)["path"] == "fused"  # lm_head: 1187 tiles
    assert sim.linear_plan(bf, 64, 4096, 4096, batches=3, sm_count=132)["path"] == "fused"  # 96 tile x batch
    assert sim.linear_plan(bf, 1, 4096, KC + 1, sm_count=132)["chunks"] == 2
    assert sim.linear_plan(bf, 1, 64, 0, path="split")["chunks"] == 1  # K = 0: one empty chunk
    assert sim.linear_plan(torch.float32, 1, 128, 4096)["n_tiles"] == 2  # SIMT tile 64 x 64
    huge = sim.linear_plan(bf, 2 ** 31 - 1, 8, 2 ** 31 - 1, path="split")
    assert "grid.x" in huge["error"] and huge["path"] == "fused"
    assert sim.linear_plan(bf, 2 ** 31 - 1, 8, 2 ** 31 - 1)["error"] == ""  # auto falls back to fused
    assert "grid.y" in sim.linear_plan(bf, 1, 65536 * 128, 64)["error"]


@pytest.mark.parametrize("dtype,sm_count,batch_sizes", [
    (torch.float32, cuda_sim.SIM_SM_COUNT, (2, 64, 128, 129, 250)),  # SIMT 64 x 64: split up to M = 128
    (torch.bfloat16, 2, (5, 130)),                                    # mma 128 x 128: split up to M = 128
])
def test_row_invariance_across_the_path_switch(sim, dtype, sm_count, batch_sizes):
    """Under path=auto a row alone runs split-parallel; in larger batches the output tiles reach the
    SM count and the fused kernel runs: the row's bits must not change."""
    K = KC + 6
    w = _rand((40, K), dtype, 41, K ** -0.5)
    seen = set()

    def run(rows):
        out = sim.linear(rows, w, None, torch.float32, path="auto", sm_count=sm_count)
        seen.add((rows.size(0), cuda_sim.last_linear_path()))
        return out

    failures = T.row_invariance_mismatches(run, lambda m, s: _rand((m, K), dtype, s), batch_sizes=batch_sizes)
    assert not failures, failures
    paths = dict(seen)
    assert paths[1] == "split" and paths[max(batch_sizes)] == "fused", paths


def test_path_env_knob(sim, monkeypatch):
    """BATCH_INVARIANT_CUDA_LINEAR_PATH (read by the device launcher; the simulator reads it when no
    path is passed): auto / fused / split, anything else a clear error."""
    x, w = _rand((3, KC + 8), torch.float32, 42), _rand((8, KC + 8), torch.float32, 43)
    monkeypatch.delenv("BATCH_INVARIANT_CUDA_LINEAR_PATH", raising=False)
    sim.linear(x, w)
    assert sim.last_linear_path() == "split"  # auto: one tile on SIM_SM_COUNT SMs
    for value in ("fused", "split", "auto", ""):
        monkeypatch.setenv("BATCH_INVARIANT_CUDA_LINEAR_PATH", value)
        sim.linear(x, w)
        assert sim.last_linear_path() == (value if value == "fused" else "split"), value
    monkeypatch.setenv("BATCH_INVARIANT_CUDA_LINEAR_PATH", "splitk")
    with pytest.raises(ValueError, match="BATCH_INVARIANT_CUDA_LINEAR_PATH must be auto, fused or split, got 'splitk'"):
        sim.linear(x, w)
    assert T.bits_equal(sim.linear(x, w, path="fused"), sim.linear(x, w, path="split"))  # an explicit path wins


# ------------------------------------------------------------------------------------------
# Device compile check (no GPU needed): the same header through nvcc.

_NVCC_CHECK = Path(__file__).with_name("nvcc_check_linear.cu")


def test_linear_kernels_compile_with_nvcc_for_sm80_and_sm90a(nvcc, tmp_path):
    for arch, body in nvcc_check.nvcc_compile(_NVCC_CHECK, tmp_path).items():
        # one instruction family per (dtype, arch): mma.sync m16n8k16 with fp32 accumulators, fed
        # by ldmatrix and cp.async; no wgmma, no TF32, nothing approximate or flushed.
        assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in body
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in body
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body and "cp.async.cg.shared.global" in body
        assert not re.search(r"wgmma|tf32", body)
        assert nvcc_check.ptx_violations(body) == [], arch
        assert "fma.rn.f32" in body  # the fp32 SIMT path
    # -fmad=false changes nothing: nvcc had nothing to contract.
    assert (nvcc_check.nvcc_ptx(_NVCC_CHECK, "90a", workdir=tmp_path)
            == nvcc_check.nvcc_ptx(_NVCC_CHECK, "90a", fmad=False, workdir=tmp_path)), \
        "the PTX depends on -fmad: some fp32 arithmetic is not explicitly rounded"


def test_ptxas_spill_report_is_parsed():
    """nvcc_compile refuses spilling kernels; proof that its parser sees a spill (and only that)."""
    verbose = ("ptxas info    : Compiling entry function '_Z1av' for 'sm_90a'\n"
               "    16 bytes stack frame, 290 bytes spill stores, 300 bytes spill loads\n"
               "ptxas info    : Compiling entry function '_Z1bv' for 'sm_80'\n"
               "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert nvcc_check._spilling_kernels(verbose) == ["'_Z1av' ('sm_90a'): 290 bytes spill stores"]
    assert nvcc_check._spilling_kernels(verbose, {"_Z1a": 290}) == []
