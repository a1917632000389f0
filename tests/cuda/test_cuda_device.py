"""The CUDA extension's kernels on a GPU (bench/gpu_check.sh runs this file; elsewhere it skips):
correctness vs the float64 references, bitwise invariance over M / company / prefill vs decode on
the device, and the simulator's claim itself - the row and SIMT attention kernels give the same
bits on the GPU as in the CPU SIMT simulator (the MMA-based linear and tensor-core attention are
only required to be close: the simulator cannot reproduce the tensor cores' internal rounding),
the linear's two realisations of the K chunks (fused, split-parallel) and the attention's two
paths (splits folded in the block, split-parallel + combine) give the same bits on the device."""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import backends, cuda_sim
from batch_invariant import testing as T
from batch_invariant.ops.linear import linear_ref
from batch_invariant.ops.norm import rms_norm_ref


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = backends.backend_unavailable_reason("cuda", "cuda")
    if reason is not None:
        pytest.skip(f"backend cuda: {reason}")
    bi.set_backend("cuda")
    yield torch.device("cuda")
    bi.set_backend(None)


def _rand(shape, dtype, seed, device, scale=1.0):
    return cuda_sim.randn(shape, dtype, seed, scale).to(device)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_linear_on_gpu(gpu, dtype):
    k, n = 4096, 1536
    w = _rand((n, k), dtype, 1, gpu, k ** -0.5)
    x = _rand((300, k), dtype, 2, gpu)
    # Reason: fp32 accumulation, one rounding: one output ulp + K fp32 roundings of sum|x w|.
    bound = (2.0 ** -7 if dtype == torch.bfloat16 else 0) + k * 2.0 ** -23 * float((x.double().abs() @ w.double().abs().T).max())
    assert T.max_abs_error(bi.linear(x, w), linear_ref(x, w)) <= bound * 4
    fails = T.row_invariance_mismatches(lambda rows: bi.linear(rows, w), lambda m, s: _rand((m, k), dtype, s, gpu))
    assert not fails, fails[:5]
    assert not T.column_block_mismatches(bi.linear, x[:33], w, [(0, 1), (5, 200), (1000, 1536)])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
def test_rows_on_gpu_equal_the_simulator(gpu, sim, dtype):
    x = _rand((37, 4096), dtype, 3, gpu, 3.0)
    w = _rand((4096,), dtype, 4, gpu)
    out = bi.rms_norm(x, w, 1e-6)
    # Reason: an fp32 sum of 4096 squares and three roundings: a few output ulps.
    assert T.max_abs_error(out.cpu(), rms_norm_ref(x.cpu(), w.cpu(), 1e-6)) <= 4 * float(out.abs().max()) * 2.0 ** -7
    assert T.bits_equal(out.cpu(), sim.rms_norm(x.cpu(), w.cpu(), 1e-6))
    logits = _rand((5, 151936), torch.float32, 5, gpu, 4.0)
    assert T.bits_equal(bi.log_softmax(logits).cpu(), sim.log_softmax(logits.cpu()))
    fails = T.row_invariance_mismatches(lambda rows: bi.rms_norm(rows, w, 1e-6),
                                        lambda m, s: _rand((m, 4096), dtype, s, gpu, 3.0))
    assert not fails, fails[:5]


def test_attention_on_gpu_prefill_equals_decode(gpu):
    dtype, hq, hk, d, bs = torch.bfloat16, 32, 8, 128, 16
    lengths = [700, 33, 1]
    k_all = [_rand((n, hk, d), dtype, 10 + i, gpu) for i, n in enumerate(lengths)]
    v_all = [_rand((n, hk, d), dtype, 20 + i, gpu) for i, n in enumerate(lengths)]
    q_all = [_rand((n, hq, d), dtype, 30 + i, gpu) for i, n in enumerate(lengths)]
    runs = {}
    for name, schedule in (("prefill", T.prefill_schedule(lengths)), ("chunked", T.chunked_schedule(lengths, 64)),
                           ("decode", T.decode_schedule(lengths, 16))):
        runs[name] = T.attention_schedule(bi.attention, bi.write_kv_cache, q_all, k_all, v_all, schedule,
                                          block_size=bs)
    for name in ("chunked", "decode"):
        assert all(T.bits_equal(a, b) for a, b in zip(runs["prefill"], runs[name])), name


@pytest.mark.parametrize("d", (96, 128))
def test_attention_split_path_on_gpu_equals_sequential_and_the_simulator(gpu, sim, monkeypatch, d):
    """Long-context decode (2 and 3 splits of 512 keys, a 1-key sequence): the split-parallel path
    (one warp / block per split + the combine kernel) gives the sequential path's bits on the
    device; and the simulator's bits for the SIMT kernels (bf16 D = 96), a close result for the
    tensor-core ones (bf16 D = 128: the simulator's mma is not the tensor core's rounding)."""
    dtype, hq, hk, bs = torch.bfloat16, 8, 2, 16
    assert sim.attention_kernel(dtype, d) == ("mma" if d == 128 else "simt")
    ctx = [1100, 600, 1]
    nblk = [-(-c // bs) for c in ctx]
    perm = torch.randperm(sum(nblk) + 2, generator=torch.Generator().manual_seed(1))
    table, cur = torch.full((len(ctx), max(nblk) + 3), int(perm[-1]), dtype=torch.int32), 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[cur:cur + n]
        cur += n
    kc = _rand((sum(nblk) + 2, bs, hk, d), dtype, 40, "cpu")
    vc = _rand((sum(nblk) + 2, bs, hk, d), dtype, 41, "cpu")
    q = _rand((len(ctx), hq, d), dtype, 42, "cpu")
    qsl = torch.arange(len(ctx) + 1, dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    args = [t.to(gpu) for t in (q, kc, vc, qsl, lens, table)]
    got = {}
    for path in ("sequential", "split", "auto"):
        monkeypatch.setenv("BATCH_INVARIANT_CUDA_ATTN_PATH", path)
        got[path] = [t.cpu() for t in torch.ops.batch_invariant.attention_with_lse(*args, 0.088)]
    for path in ("split", "auto"):
        assert T.bits_equal(got[path][0], got["sequential"][0]) and T.bits_equal(got[path][1], got["sequential"][1])
    s_out, s_lse = sim.attention(q, kc, vc, qsl, lens, table, 0.088, with_lse=True, path="split")
    if d != 128:
        assert T.bits_equal(got["split"][0], s_out) and T.bits_equal(got["split"][1], s_lse)
    else:
        # Reason: the k16 MMA steps may differ in the last fp32 place (truncating alignment), which
        # can flip P's bf16 rounding: a few bf16 ulps of the output, fp32-level lse differences.
        assert T.max_abs_error(got["split"][0], s_out) <= 4 * 2.0 ** -8 * float(s_out.abs().max())
        assert T.max_abs_error(got["split"][1], s_lse) <= 1e-4 * (1 + float(s_lse.abs().max()))


def test_attention_mma_qwen3_8b_shapes_on_gpu(gpu, monkeypatch):
    """bf16, D = 128, 32 q heads on 8 kv heads, contexts of 4096 keys (8 splits): whole prefill ==
    chunked prefill == decode token by token (the tensor-core kernels' tiles, splits and the
    sequence's company all change), and the split-parallel path == the sequential one, bitwise."""
    dtype, hq, hk, d, bs = torch.bfloat16, 32, 8, 128, 16
    lengths = [4096, 4000, 5]
    k_all = [_rand((n, hk, d), dtype, 60 + i, gpu) for i, n in enumerate(lengths)]
    v_all = [_rand((n, hk, d), dtype, 70 + i, gpu) for i, n in enumerate(lengths)]
    q_all = [_rand((n, hq, d), dtype, 80 + i, gpu) for i, n in enumerate(lengths)]
    runs = {}
    for name, schedule, path in (("prefill", T.prefill_schedule(lengths), "auto"),
                                 ("prefill/sequential", T.prefill_schedule(lengths), "sequential"),
                                 ("chunked", T.chunked_schedule(lengths, 640), "auto"),
                                 ("decode", T.decode_schedule(lengths, 3968), "auto"),
                                 ("decode/split", T.decode_schedule(lengths, 3968), "split"),
                                 ("decode/sequential", T.decode_schedule(lengths, 3968), "sequential")):
        monkeypatch.setenv("BATCH_INVARIANT_CUDA_ATTN_PATH", path)
        runs[name] = T.attention_schedule(bi.attention, bi.write_kv_cache, q_all, k_all, v_all, schedule,
                                          block_size=bs, shuffle_seed=len(runs))
    for name in runs:
        assert all(T.bits_equal(a, b) for a, b in zip(runs["prefill"], runs[name])), name


def test_linear_split_path_on_gpu_equals_fused(gpu, monkeypatch):
    """K chunks (contract GPU_MATMUL_K_CHUNK) on the device, Qwen3-8B-like shapes: the split-parallel
    path (one block per tile and chunk + the ordered combine) gives the fused kernel's bits, for
    the M the auto rule sends either way; bias and fp32 output through the combine too; the path
    knob rejects a bad value."""
    dtype, n = torch.bfloat16, 4096
    for k in (4096, 12288):
        w = _rand((n, k), dtype, 50, gpu, k ** -0.5)
        b = _rand((n,), dtype, 51, gpu)
        for m in (1, 16, 64, 300):
            x = _rand((m, k), dtype, 52 + m, gpu)
            got = {}
            for path in ("fused", "split", "auto"):
                monkeypatch.setenv("BATCH_INVARIANT_CUDA_LINEAR_PATH", path)
                got[path] = (bi.linear(x, w), bi.linear(x, w, b, out_dtype=torch.float32))
            for path in ("split", "auto"):
                for i in range(2):
                    assert T.bits_equal(got[path][i], got["fused"][i]), (k, m, path, i)
            # Reason: fp32 chunk sums, one rounding: an output ulp + K fp32 roundings of sum|x w|.
            mag = float((x.double().abs() @ w.double().abs().T).max())
            assert T.max_abs_error(got["fused"][0], linear_ref(x, w)) <= 4 * (2.0 ** -7 * mag + k * 2.0 ** -23 * mag)
    monkeypatch.setenv("BATCH_INVARIANT_CUDA_LINEAR_PATH", "splitk")
    with pytest.raises(RuntimeError, match="BATCH_INVARIANT_CUDA_LINEAR_PATH must be auto, fused or split"):
        bi.linear(x, w)
