"""CUDA row kernels (rms_norm, fused_add_rms_norm, log_softmax, softmax, row mean) run on the CPU
SIMT simulator (csrc/cuda/sim, built by batch_invariant.cuda_sim): correctness vs the float64
references with stated rounding bounds, bitwise row invariance, determinism under both fiber
schedules, strided / misaligned / in-place rows, masked logits, a negative control, the
simulator's own misuse detection, the deterministic exp / log routines, and an nvcc compile check
of the same headers for sm_80 and sm_90a (with a PTX check: no approximate / flush-to-zero
instructions, no contractible plain fp32 operations)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from batch_invariant import cuda_sim, nvcc_check
from batch_invariant import testing as T
from batch_invariant.ops.norm import fused_add_rms_norm_ref, rms_norm_ref
from batch_invariant.ops.softmax import log_softmax_ref, mean_ref, softmax_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EPS = 1e-6
U32 = 2.0 ** -24  # fp32 unit roundoff
BATCHES = (1, 2, 3, 7, 16, 17, 33)
# 1: a single element; 17: one warp, partial chunk; 300: multi-warp; 1100: > THREADS * 4 (256
# threads) and not a multiple of the block or the chunk; 9000: THREADS = 1024 with several chunks
# per thread (the launcher's loop).
WIDTHS = (1, 17, 300, 1100, 9000)
ROW_OPS = ("rms_norm", "fused_add_rms_norm", "log_softmax", "softmax", "mean")


def _rand(shape, dtype, seed, scale=3.0):
    return cuda_sim.randn(shape, dtype, seed, scale)


_unit_roundoff = cuda_sim.UNIT_ROUNDOFF.__getitem__


def _order_terms(width: int, dtype, threads: int) -> float:
    """Rounding steps on the longest path of the kernel's reduction: the elements one thread folds
    in sequence (its chunks of 16 bytes) plus the log2(THREADS) levels of the shuffle / warp tree."""
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    chunks = math.ceil(width / vec)
    return math.ceil(chunks / threads) * vec + math.log2(threads)


def _assert_within(got, exact, dtype, rel32, abs32=0.0):
    """|got - exact| <= u_out*|exact|*(1 + rel32) + rel32*|exact| + abs32 + tiny: a value computed in
    fp32 with relative error rel32 (absolute abs32), then rounded once to `dtype` (unit roundoff
    u_out); tiny: the rounding of results near the dtype's smallest normal."""
    exact = exact.double()
    mag = exact.abs()
    tol = mag * (_unit_roundoff(dtype) * (1 + rel32) + rel32) + abs32 + torch.finfo(dtype).tiny * _unit_roundoff(dtype)
    err = (got.double() - exact).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), f"{int(bad.sum())} elements out of bound; worst excess {float((err - tol).max()):.3g}"


def _run(sim, name, x, w=None, out_dtype=None, threads=None):
    if name == "rms_norm":
        return sim.rms_norm(x, w, EPS, threads=threads)
    if name == "fused_add_rms_norm":  # both outputs side by side (residual: x flipped)
        return torch.cat(sim.fused_add_rms_norm(x, x.flip(-1), w, EPS, threads=threads), dim=-1)
    if name == "log_softmax":
        return sim.log_softmax(x, out_dtype or torch.float32, threads=threads)
    if name == "softmax":
        return sim.softmax(x, out_dtype, threads=threads)
    return sim.row_mean(x, out_dtype, threads=threads)


def _check(sim, name, x, w, out_dtype=None, threads=None):
    """Runs op `name` on the simulator and checks it against its float64 reference."""
    width = x.size(-1)
    block = threads or (sim.rms_norm_threads(width) if "rms" in name else sim.row_softmax_threads(width))
    terms = _order_terms(width, x.dtype, block)
    if name in ("rms_norm", "fused_add_rms_norm"):
        if name == "rms_norm":
            got = sim.rms_norm(x, w, EPS, threads=threads)
            z = x
        else:
            res = _rand(x.shape, x.dtype, seed=width + 7)
            got, z = sim.fused_add_rms_norm(x, res, w, EPS, threads=threads)
            _, ref_z = fused_add_rms_norm_ref(x, res, w, EPS)
            assert T.bits_equal(z, ref_z), "new residual: one rounding of an exact fp32 sum must be exact"
            assert T.bits_equal(got, sim.rms_norm(z, w, EPS, threads=threads)), "fused != rms_norm(z)"
        # Reason: sum of positive squares (fma): <= terms u relative; /H, +eps, sqrt, 1/s and the
        # two products: <= 8 u more.
        _assert_within(got, rms_norm_ref(z.double(), w.double(), EPS), x.dtype, (terms + 8) * U32)
        return got
    if name == "mean":
        got = sim.row_mean(x, out_dtype, threads=threads)
        # Reason: fp32 sum with terms * u * sum|z| absolute error (+2 u for / V), then / V.
        abs32 = (terms + 2) * U32 * x.double().abs().mean(-1)
        _assert_within(got, mean_ref(x, torch.float64), got.dtype, 2 * U32, abs32)
        return got
    z = x.double()
    spread = float((z.max(-1).values - z.min(-1).values).max())  # max |z - max|
    # exp(z - mx): the rounding of z - mx (u * spread relative to the result) and exp_f32's
    # ~1 ulp (2 u); the sum adds its `terms` u: rel_s relative error of s.
    rel_s = (spread + 2 + terms) * U32
    if name == "log_softmax":
        got = sim.log_softmax(x, out_dtype or torch.float32, threads=threads)
        # Reason: out = (z - mx) - log(s): u * spread from z - mx, log(s)'s absolute error rel_s
        # plus log_f32's ~1 ulp of |log s| <= log V, and the final subtraction's u (relative).
        _assert_within(got, log_softmax_ref(x, torch.float64), got.dtype, 2 * U32,
                       rel_s + (spread + 2 * math.log(width) + 4) * U32)
    else:
        got = sim.softmax(x, out_dtype, threads=threads)
        # Reason: out = e / s: e's (spread + 2) u, s's rel_s and the division's u, relative.
        _assert_within(got, softmax_ref(x, torch.float64), got.dtype, rel_s + (spread + 4) * U32)
    return got


def _inputs(rows, width, dtype, seed):
    return _rand((rows, width), dtype, seed), _rand((width,), dtype, seed=99, scale=1.0) + 1


# ------------------------------------------------------------------------------------------
# Correctness and determinism.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ROW_OPS)
def test_matches_float64_and_is_deterministic(sim, name, dtype):
    out_dtypes = (None, torch.float32) if name in ("log_softmax", "softmax", "mean") else (None,)
    for width in WIDTHS:
        rows = 2 if width > 2000 else 5
        x, w = _inputs(rows, width, dtype, seed=width)
        for out_dtype in out_dtypes:
            first = _check(sim, name, x, w, out_dtype)
            again = _check(sim, name, x, w, out_dtype)
            assert T.bits_equal(first, again), f"{name} width {width}: run-to-run difference"
            with sim.reverse_schedule():  # a missing barrier would show up here
                reverse = _check(sim, name, x, w, out_dtype)
            assert T.bits_equal(first, reverse), f"{name} width {width}: differs under the reverse fiber schedule"


@pytest.mark.parametrize("name", ROW_OPS)
def test_any_block_size_is_correct(sim, name):
    """The kernels are correct for every THREADS (here: several chunks per thread, a partial
    last chunk, one warp, and more threads than chunks)."""
    for threads in (32, 64, 1024):
        x, w = _inputs(3, 1100, torch.bfloat16, seed=threads)
        _check(sim, name, x, w, torch.float32 if name in ("log_softmax", "softmax", "mean") else None, threads)


def test_block_size_is_a_function_of_the_width_only(sim):
    for width in (1, 8, 17, 256, 257, 1100, 4096, 8192, 9000, 151936):
        expected = min(1024, max(32, 1 << math.ceil(math.log2(max(1, math.ceil(width / 8))))))
        assert sim.rms_norm_threads(width) == expected
        assert sim.row_softmax_threads(width) == expected
    sim.log_softmax(_rand((3, 1100), torch.float32, seed=0))  # grid = rows, block = 256
    stats = sim.last_launch_stats()
    assert (stats["blocks"], stats["threads"]) == (3, 3 * 256)


def test_empty_inputs(sim):
    w = torch.ones(8)
    assert sim.rms_norm(torch.empty(0, 8), w, EPS).shape == (0, 8)
    assert sim.fused_add_rms_norm(torch.empty(0, 8), torch.empty(0, 8), w, EPS)[1].shape == (0, 8)
    assert sim.log_softmax(torch.empty(0, 5)).shape == (0, 5)
    assert sim.softmax(torch.empty(3, 0)).shape == (3, 0)
    assert bool(torch.isnan(sim.row_mean(torch.empty(3, 0))).all())


def test_rms_norm_fp32_weight(sim):
    x = _rand((4, 300), torch.bfloat16, seed=1)
    w = _rand((300,), torch.float32, seed=2, scale=0.1) + 1  # not bf16-representable
    got = sim.rms_norm(x, w, 1e-5)
    _assert_within(got, rms_norm_ref(x.double(), w.double(), 1e-5), torch.bfloat16, 32 * U32)
    got16 = sim.fused_add_rms_norm(x.half(), x.half(), w, 1e-5)[0]
    _assert_within(got16, rms_norm_ref((2 * x).half().double(), w.double(), 1e-5), torch.float16, 32 * U32)


# ------------------------------------------------------------------------------------------
# Invariance.

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ROW_OPS)
def test_row_invariance(sim, name, dtype):
    w = _rand((1100,), dtype, seed=99, scale=1.0) + 1
    out_dtype = torch.float32 if name in ("log_softmax", "softmax", "mean") else None
    failures = T.row_invariance_mismatches(lambda rows: _run(sim, name, rows, w, out_dtype),
                                           lambda m, seed: _rand((m, 1100), dtype, seed), batch_sizes=BATCHES)
    assert not failures, failures


@pytest.mark.parametrize("name", ("rms_norm", "log_softmax", "mean"))
def test_negative_control_batch_dependent_block_size_is_caught(sim, name):
    """A launcher that picked THREADS from the number of rows (as a naive occupancy heuristic
    would) changes the reduction order with the batch; the same property must catch it. (fp32
    output so that order effects are not rounded away; rms_norm rows carry one large element so
    the sum of squares is order-sensitive; r = 1/sqrt(.) still hides some differences, hence up
    to three probe rows - all fixed seeds, so the outcome is deterministic.)"""
    w = _rand((1100,), torch.float32, seed=99, scale=1.0) + 1

    def variant(rows):
        return _run(sim, name, rows, w, torch.float32, threads=32 if rows.size(0) < 8 else 256)

    def rows_from(offset):
        def make(m, seed):
            x = _rand((m, 1100), torch.float32, seed + offset)
            if name == "rms_norm":
                x[:, 0] = 2.0 ** 14
            return x
        return make

    failures = []
    for offset in (0, 100, 200):
        failures += T.row_invariance_mismatches(variant, rows_from(offset), batch_sizes=BATCHES)
        if failures:
            break
    assert failures, "the batch-dependent variant was not detected"
    # The launcher's real choice (a function of the width) passes the same property.
    assert not T.row_invariance_mismatches(lambda rows: _run(sim, name, rows, w, torch.float32),
                                           rows_from(0), batch_sizes=BATCHES)


@pytest.mark.parametrize("name", ROW_OPS)
def test_strided_misaligned_and_in_place_rows(sim, name):
    """Row strides / offsets that defeat the 16-byte vector loads and stores give the same bits
    (the reduction order does not depend on the load path); fused in place == out of place."""
    dtype, width = torch.bfloat16, 1100
    w = _rand((width,), dtype, seed=99, scale=1.0) + 1
    x = _rand((6, width), dtype, seed=5)
    ref = _run(sim, name, x, w, torch.float32)
    for pad, offset in ((3, 0), (8, 1), (5, 5)):
        base = torch.zeros(6, width + pad, dtype=dtype)
        view = base[:, offset:offset + width]
        view.copy_(x)
        assert view.stride(0) == width + pad and view.stride(1) == 1
        assert T.bits_equal(_run(sim, name, view, w, torch.float32), ref), f"pad {pad} offset {offset}"
    if name == "fused_add_rms_norm":
        res = x.flip(-1).contiguous()
        xi, ri = x.clone(), res.clone()
        out, z = sim.fused_add_rms_norm(xi, ri, w, EPS, out=xi, residual_out=ri)  # vLLM's in-place form
        assert out.data_ptr() == xi.data_ptr() and z.data_ptr() == ri.data_ptr()
        assert T.bits_equal(torch.cat((xi, ri), dim=-1), ref)


def test_log_softmax_masked_logits(sim):
    """-inf logits (top-k / top-p masks) get exactly -inf log-probabilities and probability 0; the
    kept entries match the float64 reference renormalised over the kept set; an all -inf row gives
    NaN (as torch)."""
    for dtype in DTYPES:
        x = _rand((4, 1100), dtype, seed=3)
        g = torch.Generator().manual_seed(4)
        mask = torch.rand(4, 1100, generator=g) < 0.7
        mask[:, 5] = False
        x = x.masked_fill(mask, float("-inf"))
        x[3] = float("-inf")
        got = sim.log_softmax(x)
        probs = sim.softmax(x, torch.float32)
        ref = log_softmax_ref(x, torch.float64)
        assert torch.equal(got[:3][mask[:3]], torch.full_like(got[:3][mask[:3]], float("-inf")))
        assert torch.equal(probs[:3][mask[:3]], torch.zeros_like(probs[:3][mask[:3]]))
        assert bool(torch.isnan(got[3]).all()) and bool(torch.isnan(ref[3]).all())
        assert bool(torch.isnan(probs[3]).all())
        keep = ~mask[:3]
        spread = float((x[:3].double().masked_fill(mask[:3], 0).abs().max())) * 2
        err = (got[:3][keep].double() - ref[:3][keep]).abs().max().item()
        # Reason: as in _check for log_softmax (spread of the kept logits, V = 1100 terms).
        bound = (spread + 2 + _order_terms(1100, dtype, 256)) * U32 + (2 * spread + 2 * math.log(1100) + 8) * U32
        assert err <= bound, (dtype, err, bound)
        assert T.bits_equal(got, sim.log_softmax(x)), "run-to-run difference"


# ------------------------------------------------------------------------------------------
# The deterministic exp / log routines (row_common.cuh) and the simulator itself.

def _ulp_error(got, x, fn):
    ref = fn(x.double())
    r32 = ref.float()
    ok = torch.isfinite(r32) & (r32 != 0)
    spacing = (torch.nextafter(r32.abs(), torch.tensor(float("inf"))) - r32.abs()).double()
    err = (got.double() - ref).abs() / spacing
    return float(err[ok].max())


def test_exp_log_accuracy_and_special_values(sim):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200_000, generator=g) * 200 - 100).float()
    assert _ulp_error(sim.exp_f32(x), x, torch.exp) <= 1.5
    x = torch.exp(torch.rand(200_000, generator=g).double() * 190 - 100).float()  # incl. subnormals
    assert _ulp_error(sim.log_f32(x), x, torch.log) <= 1.5
    x = (torch.rand(200_000, generator=g) * 0.6 + 0.7).float()  # around 1 (cancellation)
    assert _ulp_error(sim.log_f32(x), x, torch.log) <= 1.5
    inf, nan = float("inf"), float("nan")
    e = sim.exp_f32(torch.tensor([0.0, -inf, inf, nan, 89.0, -104.0, -103.0]))
    assert e[:3].tolist() == [1.0, 0.0, inf] and math.isnan(e[3]) and e[4] == inf and e[5] == 0.0 and 0 < e[6] < 1e-44
    lg = sim.log_f32(torch.tensor([1.0, 0.0, -0.0, inf, -1.0, nan, 1e-45]))
    assert lg[:4].tolist() == [0.0, -inf, -inf, inf] and math.isnan(lg[4]) and math.isnan(lg[5])
    assert abs(lg[6].item() - math.log(1.401298464324817e-45)) < 1e-5


def test_simulator_detects_missing_barriers_and_warp_misuse(sim):
    # A kernel that reads a neighbour's write without __syncthreads: the two schedules disagree.
    forward = sim.selftest("missing_sync", 64)
    with sim.reverse_schedule():
        reverse = sim.selftest("missing_sync", 64)
    assert forward != reverse
    # With the barrier both schedules give sum(1..64).
    assert sim.selftest("with_sync", 64) == 2080.0
    with sim.reverse_schedule():
        assert sim.selftest("with_sync", 64) == 2080.0
    with pytest.raises(RuntimeError, match="deadlock.*at a warp operation"):
        sim.selftest("divergent_shfl", 64)
    with pytest.raises(RuntimeError, match="warp divergence"):
        sim.selftest("mixed_warp_ops", 64)
    with pytest.raises(RuntimeError, match="deadlock.*__syncthreads"):
        sim.selftest("partial_sync", 64)
    # ballot(lane % 3 == 0) = 0x49249249; any(lane == 7), all(true), any(false); shfl from lane 6
    # (value 60); shfl_xor(5) seen by lane 5 (lane 0's value 0).
    ballot = 0x49249249
    expected = (ballot & 0xFFFF) + 65536.0 * (ballot >> 16) + 1e10 * 3 + 1e12 * 60 + 1e15 * 0
    assert sim.selftest("votes", 64) == expected
    # The simulator keeps working after a failed launch.
    assert sim.selftest("with_sync", 32) == 528.0


# ------------------------------------------------------------------------------------------
# Device compile check (no GPU needed): the same headers through nvcc.

_NVCC_CHECK = Path(__file__).with_name("nvcc_check.cu")


def test_headers_compile_with_nvcc_for_sm80_and_sm90a(nvcc, tmp_path):
    body = nvcc_check.nvcc_compile(_NVCC_CHECK, tmp_path)["90a"]
    # The contract's arithmetic is exactly rounded (nvcc_check.FORBIDDEN_PTX).
    assert nvcc_check.ptx_violations(body) == []
    assert "shfl.sync.bfly.b32" in body and "bar.sync" in body
    # -fmad=false changes nothing: nvcc had nothing to contract.
    assert nvcc_check.nvcc_ptx(_NVCC_CHECK, "90a", fmad=False, workdir=tmp_path) == body, \
        "the PTX depends on -fmad: some fp32 arithmetic is not explicitly rounded"


def test_prune_keeps_the_current_build_and_the_newest_other(tmp_path):
    import os

    folders = [tmp_path / f"cuda-sim-{i:016x}" for i in range(4)]
    for i, f in enumerate(folders):
        f.mkdir()
        os.utime(f, (1000 + i, 1000 + i))
    (tmp_path / "cuda-build").mkdir()  # not a simulator build
    removed = cuda_sim.prune_builds(folders[0])  # the current build, the oldest by time
    assert sorted(removed) == folders[1:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folders[0].name, folders[3].name, "cuda-build"])
