"""Triton matmul backend (linear, matmul, bmm): correctness vs float64, bitwise invariance
properties, the M-bucket table, fail-closed behaviour and bad input.

Under the interpreter (CPU tensors) shapes are tiny (M <= 65, N <= 96, K <= 200, with K and N/M
tails); on a GPU (BATCH_INVARIANT_TEST_DEVICE=cuda) they are Qwen3-8B-like (K=4096, N=4096/6144).
"""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import backends, contract
from batch_invariant import testing as T
from batch_invariant.ops.linear import linear_ref
from batch_invariant.triton_kernels import _launch, interpreter
from batch_invariant.triton_kernels import matmul as mm

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPU_SHAPES = [(1, 1, 1), (3, 7, 31), (17, 33, 150), (5, 40, 64), (65, 96, 200)]  # (M, N, K)
GPU_SHAPES = [(1, 4096, 4096), (7, 6144, 4096), (129, 4096, 4096), (512, 4096, 4096), (33, 1000, 4100)]
#: Batch sizes around the interpreter buckets (16 / 32 / 64, default above) and the GPU tiles.
CPU_BATCHES = (1, 2, 3, 7, 16, 17, 33, 65)
GPU_BATCHES = (1, 2, 3, 7, 16, 17, 31, 64, 65, 127, 128, 129, 255, 256, 257, 512)


def _small(device) -> bool:
    return device.type == "cpu"  # the interpreter: ~2-3 ms per program and K step


def _rand(*shape, dtype, seed, device, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


def _weight(n, k, dtype, seed, device):
    return _rand(n, k, dtype=dtype, seed=seed, device=device, scale=k ** -0.5)


_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _rounding_bound(x, w, bias, got, ref, out_dtype):
    """Elementwise bound on |got - ref| for got = round(fp32 sum), ref = round(fp64 sum):
    half an output ulp for each of the two roundings (<= 2^-p * max(|got|, |ref|)), plus the fp32
    accumulation error of a K-term sum (<= K * 2^-23 * sum_k |x w|, a generous gamma_K), plus the
    output dtype's smallest subnormal for results that round in the subnormal range."""
    k = x.size(-1)
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    finfo = torch.finfo(out_dtype)
    return (2.0 ** -_MANTISSA[out_dtype] * torch.maximum(got.double().abs(), ref.double().abs())
            + k * 2.0 ** -23 * mag + finfo.smallest_normal * finfo.eps)


def _assert_close(x, w, bias, got, ref, out_dtype):
    excess = (got.double() - ref.double()).abs() - _rounding_bound(x, w, bias, got, ref, out_dtype)
    assert bool((excess <= 0).all()), f"outside the rounding bound by up to {excess.max().item():.3g}"


# ------------------------------------------------------------------------------------------
# Correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(5))
def test_linear_matches_float64(triton_device, dtype, case):
    m, n, k = (CPU_SHAPES if _small(triton_device) else GPU_SHAPES)[case]
    x = _rand(m, k, dtype=dtype, seed=1, device=triton_device)
    w = _weight(n, k, dtype, 2, triton_device)
    b = _rand(n, dtype=dtype, seed=3, device=triton_device)
    got = bi.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (m, n) and got.device.type == triton_device.type
    # On a GPU this also shows fp32 is IEEE: TF32 operands (10-bit mantissa) miss the bound by ~1e3x.
    _assert_close(x, w, b, got, linear_ref(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_out_and_bias(triton_device, dtype):
    m, n, k = (9, 40, 150) if _small(triton_device) else (129, 4096, 4096)
    x = _rand(m, k, dtype=dtype, seed=1, device=triton_device)
    w = _weight(n, k, dtype, 2, triton_device)
    b32 = _rand(n, dtype=torch.float32, seed=3, device=triton_device)
    got = bi.linear(x, w, b32, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    _assert_close(x, w, b32, got, linear_ref(x, w, b32, torch.float32), torch.float32)
    # The bf16/fp16 output is the fp32 result (bias included) rounded once.
    assert T.bits_equal(bi.linear(x, w, b32), got.to(dtype))
    # A bias in the weight dtype is widened exactly: the same bits as that bias in fp32.
    b = b32.to(dtype)
    assert T.bits_equal(bi.linear(x, w, b), bi.linear(x, w, b.float()))


def test_bf16_output_rounds_to_nearest_even(triton_device):
    """y = 0 + bias (fp32) rounded to bf16: ties to even, mantissa carries into the exponent, overflow."""
    one = 1 + 2 ** -7  # bf16 neighbours 1 and 1 + 2^-7
    values = [1 + 2 ** -8, one + 2 ** -8, 1 + 2 ** -8 + 2 ** -20, 2 - 2 ** -9, 2 - 2 ** -10, -(2 - 2 ** -9),
              3.3895e38, 3.4e38, float("inf"), -float("inf"), 0.1, -7.7, 65504.0]
    bias = torch.tensor(values, dtype=torch.float32, device=triton_device)
    n = bias.numel()
    x = torch.zeros(2, 16, dtype=torch.bfloat16, device=triton_device)
    w = torch.zeros(n, 16, dtype=torch.bfloat16, device=triton_device)
    got = bi.linear(x, w, bias)
    assert T.bits_equal(got, bias.to(torch.bfloat16).expand(2, n).contiguous())
    nan = bi.linear(x, w[:1], torch.tensor([float("nan")], device=triton_device))
    assert bool(nan.isnan().all())


def test_empty_and_degenerate_shapes(triton_device):
    w = _weight(24, 40, torch.bfloat16, 2, triton_device)
    assert bi.linear(torch.empty(0, 40, dtype=torch.bfloat16, device=triton_device), w).shape == (0, 24)
    x = _rand(3, 40, dtype=torch.bfloat16, seed=1, device=triton_device)
    assert bi.linear(x, w[:0]).shape == (3, 0)
    # K = 0: the empty sum is +0, plus the bias.
    b = _rand(24, dtype=torch.float32, seed=3, device=triton_device)
    got = bi.linear(x[:, :0], w[:, :0], b, out_dtype=torch.float32)
    assert T.bits_equal(got, b.expand(3, 24).contiguous())


# ------------------------------------------------------------------------------------------
# Invariance (bitwise, never a tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_invariance_and_permutation(triton_device, dtype):
    small = _small(triton_device)
    n, k = (96, 200) if small else (4096, 4096)
    w = _weight(n, k, dtype, 7, triton_device)
    fn = lambda x: bi.linear(x, w)  # noqa: E731
    make = lambda m, s: _rand(m, k, dtype=dtype, seed=s, device=triton_device)  # noqa: E731
    fails = T.row_invariance_mismatches(fn, make, batch_sizes=CPU_BATCHES if small else GPU_BATCHES)
    assert not fails, fails[:5]
    assert not T.permutation_mismatches(fn, make(33 if small else 300, 9))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_column_blocks(triton_device, dtype):
    """N-invariance: a block of output columns computed alone equals that block of a wider weight."""
    if _small(triton_device):
        x = _rand(33, 150, dtype=dtype, seed=1, device=triton_device)
        w = _weight(96, 150, dtype, 2, triton_device)
        blocks = [(0, 1), (5, 6), (0, 16), (1, 17), (30, 70), (64, 96)]
    else:
        x = _rand(65, 4096, dtype=dtype, seed=1, device=triton_device)
        w = _weight(6144, 4096, dtype, 2, triton_device)
        blocks = [(0, 1), (5, 6), (0, 16), (1, 17), (100, 333), (4096, 6144), (1234, 2345), (6143, 6144)]
    fails = T.column_block_mismatches(bi.linear, x, w, blocks)
    assert not fails, fails


def test_layouts_same_bits(triton_device):
    """Strided rows, column-major operands and 3-d x give the bits of the contiguous case."""
    small = _small(triton_device)
    m, n, k = (20, 40, 150) if small else (100, 1024, 4096)
    big = _rand(m, k + 77, dtype=torch.bfloat16, seed=1, device=triton_device)
    w_big = _rand(n, k + 13, dtype=torch.bfloat16, seed=2, device=triton_device, scale=k ** -0.5)
    x, w = big[:, 7:7 + k], w_big[:, 5:5 + k]  # row strides k + 77 and k + 13
    expect = bi.linear(x.contiguous(), w.contiguous())
    assert backends.kernel("linear", triton_device) is mm.linear
    assert T.bits_equal(bi.linear(x, w), expect)
    assert T.bits_equal(mm.linear(x, w, None, torch.bfloat16), expect)  # no copy on the way
    assert T.bits_equal(bi.linear(x.t().contiguous().t(), w), expect)  # column-major x
    assert T.bits_equal(bi.linear(x, w.t().contiguous().t()), expect)  # column-major weight
    assert T.bits_equal(bi.linear(x.contiguous().view(4, m // 4, k), w), expect.view(4, m // 4, n))
    assert T.bits_equal(bi.matmul(x, w.t()), expect)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bmm_equals_per_batch_linear(triton_device, dtype, monkeypatch):
    b_, m, n, k = (3, 20, 17, 100) if _small(triton_device) else (4, 130, 512, 4096)
    a = _rand(b_, m, k, dtype=dtype, seed=3, device=triton_device)
    b = _rand(b_, k, n, dtype=dtype, seed=4, device=triton_device, scale=k ** -0.5)
    got = bi.bmm(a, b)
    assert got.shape == (b_, m, n) and got.dtype == dtype
    b_t = b.transpose(1, 2).contiguous()
    got32 = mm.bmm_nt(a, b_t, torch.float32)
    for i in range(b_):
        assert T.bits_equal(got[i], bi.linear(a[i], b_t[i])), f"batch {i}"
        assert T.bits_equal(got32[i], mm.linear(a[i], b_t[i], None, torch.float32)), f"batch {i} (fp32 out)"
    # Batches beyond CUDA's grid-y limit are launched in slices: same bits.
    monkeypatch.setattr(mm, "_MAX_GRID_Y", 2)
    assert T.bits_equal(mm.bmm_nt(a, b_t, torch.float32), got32)


def test_deterministic(triton_device):
    for dtype in DTYPES:
        m, n, k = (33, 40, 150) if _small(triton_device) else (257, 4096, 4096)
        x, w = _rand(m, k, dtype=dtype, seed=1, device=triton_device), _weight(n, k, dtype, 2, triton_device)
        first = bi.linear(x, w)
        assert all(T.bits_equal(bi.linear(x, w), first) for _ in range(2)), dtype


# ------------------------------------------------------------------------------------------
# K chunks (contract GPU_MATMUL_K_CHUNK): fused and split realisations, the same bits

#: (M, N, K): one chunk, a short last chunk with a BLOCK_K tail, two and three chunks.
CPU_CHUNK_SHAPES = [(3, 40, 1024), (5, 24, 1030), (2, 16, 2048), (17, 33, 2100)]
GPU_CHUNK_SHAPES = [(1, 4096, 4096), (16, 4096, 12288), (64, 6144, 4096), (300, 4096, 4100)]


def _chunk_shapes(device):
    return CPU_CHUNK_SHAPES if _small(device) else GPU_CHUNK_SHAPES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_and_fused_chunks_same_bits(triton_device, dtype):
    for case, (m, n, k) in enumerate(_chunk_shapes(triton_device)):
        x = _rand(m, k, dtype=dtype, seed=case, device=triton_device)
        w = _weight(n, k, dtype, 10 + case, triton_device)
        b = _rand(n, dtype=torch.float32, seed=20 + case, device=triton_device)
        for bias, out_dtype in ((None, dtype), (b, dtype), (b, torch.float32)):
            fused = mm.linear(x, w, bias, out_dtype, _split=False)
            split = mm.linear(x, w, bias, out_dtype, _split=True)
            assert T.bits_equal(split, fused), (m, n, k, bias is not None, out_dtype)
        _assert_close(x, w, b, fused, linear_ref(x, w, b), dtype)
    # Batched: every batch's chunks combine separately.
    m, n, k = _chunk_shapes(triton_device)[-1]
    a = _rand(3, m, k, dtype=dtype, seed=5, device=triton_device)
    b_t = _rand(3, n, k, dtype=dtype, seed=6, device=triton_device, scale=k ** -0.5)
    assert T.bits_equal(mm.bmm_nt(a, b_t, torch.float32, _split=True), mm.bmm_nt(a, b_t, torch.float32, _split=False))


def _chunk_order_emulation(x, w, bias, reverse=False):
    """The contract's order with the kernel as the per-chunk primitive: each K_CHUNK slice summed
    alone (one chunk, from +0), the fp32 chunk sums added left to right from -0.0, then the bias."""
    chunk = contract.GPU_MATMUL_K_CHUNK
    sums = [mm.linear(x[:, c:c + chunk].contiguous(), w[:, c:c + chunk].contiguous(), None, torch.float32)
            for c in range(0, x.size(1), chunk)]
    total = torch.full_like(sums[0], -0.0)
    for part in (reversed(sums) if reverse else sums):
        total = total + part
    return total if bias is None else total + bias


def test_chunks_follow_the_contract_order(triton_device):
    """The full-K result equals the chunk sums added in order, bitwise, on both realisations; the
    negative control (the same sums right to left) differs, so the comparison can fail."""
    m, n, k = (9, 40, 3 * contract.GPU_MATMUL_K_CHUNK + 70) if _small(triton_device) else (64, 4096, 12288)
    for dtype in (torch.bfloat16, torch.float32):
        x = _rand(m, k, dtype=dtype, seed=1, device=triton_device)
        w = _weight(n, k, dtype, 2, triton_device)
        b = _rand(n, dtype=torch.float32, seed=3, device=triton_device)
        expect = _chunk_order_emulation(x, w, b)
        for split in (False, True):
            assert T.bits_equal(mm.linear(x, w, b, torch.float32, _split=split), expect), (dtype, split)
        assert not T.bits_equal(_chunk_order_emulation(x, w, b, reverse=True), expect), dtype


def test_row_invariance_across_the_split_switch(triton_device, monkeypatch):
    """Under auto the realisation changes with M (split while the tiles leave SMs idle); the
    probe row's bits must not. The sweep is checked to cross the switch."""
    small = _small(triton_device)
    if small:
        # Interpreter tiles (16x32 up to M=16, 32x64, 64x32, then 128x128) with 8 pretend SMs and
        # N=200: 7, 4, 7, 2 tiles -> fused, split, fused, split.
        monkeypatch.setattr(mm, "_INTERPRETER_SMS", 8)
        n, k, batches = 200, 2100, CPU_BATCHES
    else:
        n, k, batches = 4096, 4096, GPU_BATCHES + (1024, 2048)  # 128x128 tiles: split up to M=256
    decisions = set()
    real = mm.use_split

    def recording(*args):
        decisions.add(real(*args))
        return real(*args)

    monkeypatch.setattr(mm, "use_split", recording)
    w = _weight(n, k, torch.bfloat16, 7, triton_device)
    fails = T.row_invariance_mismatches(lambda x: bi.linear(x, w),
                                        lambda m, s: _rand(m, k, dtype=torch.bfloat16, seed=s, device=triton_device),
                                        batch_sizes=batches)
    assert not fails, fails[:5]
    assert decisions == {True, False}, f"the sweep did not cross the fused/split switch: {decisions}"


# ------------------------------------------------------------------------------------------
# M buckets: used only where verified bitwise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bucket_table(triton_device, dtype):
    arch = _launch.arch_key(triton_device)
    name = str(dtype).removeprefix("torch.")
    default = mm.DEFAULT_CONFIG[name]
    if arch in mm.VERIFIED_ARCHS:
        buckets = mm.CANDIDATE_BUCKETS[arch][name]
        for max_m, config in buckets:
            assert mm.matmul_config(dtype, max_m, arch) == config
        assert mm.matmul_config(dtype, buckets[-1][0] + 1, arch) == default
        # Every candidate tile gives the default tile's bits, rows that cross all the buckets.
        fails = mm.bucket_equivalence_mismatches(arch, triton_device, dtype)
        assert not fails, fails
    else:
        # Not verified on this GPU: one config for every M (bench/gpu_check.sh checks candidates).
        assert all(mm.matmul_config(dtype, m, arch) == default for m in range(1, 1100))


def test_block_k_is_the_contract():
    assert set(contract.GPU_MATMUL_BLOCK_K) == set(mm.DEFAULT_CONFIG)
    for table in mm.CANDIDATE_BUCKETS.values():
        for name, buckets in table.items():
            assert name in contract.GPU_MATMUL_BLOCK_K
            assert [b[0] for b in buckets] == sorted(b[0] for b in buckets)
            assert all(c.block_m >= 16 and c.block_n >= 16 for _, c in buckets)  # tl.dot minimum


# ------------------------------------------------------------------------------------------
# Negative control, fail-closed, bad input


def test_negative_control_catches_batch_variant_matmul(triton_device):
    """Proof that the property can fail: an M-dependent K split is detected."""
    k = 200 if _small(triton_device) else 4096
    w = _weight(32, k, torch.float32, 7, triton_device)
    fails = T.row_invariance_mismatches(lambda x: T.batch_variant_linear(x, w),
                                        lambda m, s: _rand(m, k, dtype=torch.float32, seed=s, device=triton_device),
                                        batch_sizes=(1, 2, 9, 17))
    assert fails, "the invariance property did not catch an M-dependent K split"


def test_negative_control_bucket_check_catches_tile_dependent_order(triton_device, monkeypatch):
    """Proof that the bucket check can fail: a dot whose k order depends on the tile height."""
    if triton_device.type != "cpu":
        pytest.skip("needs the interpreter's dot to be replaced (CPU tensors only)")
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    def tile_dependent_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        import triton.language as tl
        a32, b32 = interpreter._widen(a, tl), interpreter._widen(b, tl)
        if a32.shape[0] >= 32:  # tall tiles: even and odd k summed separately, then added
            part = a32[:, 0::2] @ b32[0::2] + a32[:, 1::2] @ b32[1::2]
        else:
            part = a32 @ b32
        return TensorHandle((d.data + part).astype(np.float32), d.dtype.scalar)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", tile_dependent_dot)
    assert mm.bucket_equivalence_mismatches("interpreter", triton_device, torch.float32)


def test_interpreter_without_exact_dot_fails_closed(triton_device, monkeypatch):
    if triton_device.type != "cpu":
        pytest.skip("the exact-dot patch concerns the Triton interpreter (CPU tensors) only")
    x = _rand(2, 16, dtype=torch.bfloat16, seed=1, device=triton_device)
    w = _weight(8, 16, torch.bfloat16, 2, triton_device)
    # The session fixture holds the patch; pretend it is off instead of leaving it.
    monkeypatch.setattr(interpreter, "is_active", lambda: False)
    with pytest.raises(backends.BackendUnavailableError, match="exact_dot"):
        bi.linear(x, w)
    with pytest.raises(backends.BackendUnavailableError, match="exact_dot"):
        mm.bmm_nt(x[None], w[None], torch.bfloat16)


def test_launcher_bad_input(triton_device):
    x = _rand(4, 16, dtype=torch.float32, seed=1, device=triton_device)
    w = _rand(5, 16, dtype=torch.float32, seed=2, device=triton_device)
    with pytest.raises(TypeError, match="dtypes differ"):
        mm.linear(x, w.half(), None, torch.float32)
    with pytest.raises(TypeError, match="float64"):
        mm.linear(x.double(), w.double(), None, torch.float64)
    with pytest.raises(TypeError, match="out_dtype"):
        mm.linear(x.bfloat16(), w.bfloat16(), None, torch.float16)
    with pytest.raises(ValueError, match="K differs"):
        mm.linear(x, w[:, :8], None, torch.float32)
    with pytest.raises(ValueError, match="contiguous last dim"):
        mm.linear(x.t().contiguous().t(), w, None, torch.float32)
    with pytest.raises(ValueError, match="bias"):
        mm.linear(x, w, torch.zeros(4, device=triton_device), torch.float32)
    with pytest.raises(ValueError, match="3-d"):
        mm.bmm_nt(x, w, torch.float32)
    with pytest.raises(ValueError, match="batch sizes differ"):
        mm.bmm_nt(x[None], torch.stack([w, w]), torch.float32)
