"""Triton matmul backend: ``linear`` (y = x @ w.T + b) and ``bmm_nt``, batch-invariant.

Contract (contract.py ``GPU_MATMUL_BLOCK_K`` / ``GPU_MATMUL_K_CHUNK``, docs/invariance.md): K is cut
into chunks of K_CHUNK elements from k = 0; each chunk is one fp32 accumulator per output element
that starts at +0 and walks the chunk upward in steps of BLOCK_K (a constant per dtype, never chosen
by M or N), one ``tl.dot`` per step, the masked K tail loading zeros; the chunk sums are added left
to right to a total that starts at -0.0 (exact: -0 + x == x). fp32 operands use IEEE fp32 (never
TF32); no autotuning. The bias is added in fp32 after the total and the result is rounded once.

The chunks are realised two ways with the same bits: *fused* (one program per output tile keeps a
second accumulator, the total) and *split* (one program per (tile, chunk) stores its fp32 chunk sum;
``_chunk_combine_kernel`` adds them in chunk order). Split is used when the output tiles alone
would leave most SMs idle (small M: decode); which one runs never changes an element's arithmetic.

What may change with M is the output tile (BLOCK_M x BLOCK_N, warps, stages): the per-element K
order stays the same, but whether the tensor-core instruction sequence gives the same bits for
every tile shape is a property of the hardware, so M buckets are used only on architectures listed
in ``VERIFIED_ARCHS`` (checked bitwise there by :func:`bucket_equivalence_mismatches`, which the
GPU acceptance script runs). Everywhere else one ``DEFAULT_CONFIG`` per dtype serves every M.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .. import contract
from . import _launch, interpreter


@triton.jit
def _nt_matmul_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, M, N, K,
                      stride_xb, stride_xm, stride_xk, stride_wb, stride_wn, stride_wk, stride_yb, stride_ym,
                      HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      K_CHUNK: tl.constexpr, GROUP_M: tl.constexpr):
    """One BLOCK_M x BLOCK_N tile of y[b] = x[b] @ w[b].T (+ bias). Fused (SPLIT false): all of K,
    chunk sums added in order into the total, bias, one rounding into y. Split: only chunk
    program_id(2), its fp32 sum stored into the partials part[b, chunk] (layout [B, chunks, M, N])."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M consecutive M tiles sweep the N tiles together, so a weight tile is
    # reused from L2 while it is hot. Only *which* program computes a tile changes, never the
    # arithmetic of an element.
    tiles_per_band = GROUP_M * tiles_n
    band = pid // tiles_per_band
    first_tile_m = band * GROUP_M
    band_height = tl.minimum(tiles_m - first_tile_m, GROUP_M)
    tile_m = first_tile_m + (pid % tiles_per_band) % band_height
    tile_n = (pid % tiles_per_band) // band_height
    if SPLIT:
        k_begin = tl.program_id(2) * K_CHUNK
        k_end = tl.minimum(k_begin + K_CHUNK, K)
    else:
        k_begin = 0
        k_end = K

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge re-read a valid row (their results are never stored): loads need
    # no M/N mask, and an element's value never depends on what its neighbours in the tile hold.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = x_ptr + batch * stride_xb + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + batch * stride_wb + cols[None, :] * stride_wn + (k_begin + offs_k)[:, None] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the current chunk's sum, from +0
    total = tl.full((BLOCK_M, BLOCK_N), -0.0, dtype=tl.float32)  # -0.0: the first add is exact
    for k0 in range(k_begin, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            # K tail: missing elements are +0 products, the same for every row (a function of K).
            k_left = K - k0
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if x_ptr.dtype.element_ty == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")  # the contract: never TF32
        else:
            acc = tl.dot(a, b, acc)  # bf16/fp16 operands, fp32 accumulation on the tensor cores
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        if not SPLIT:
            # A chunk ends where the next k is a multiple of K_CHUNK or past K: add it, restart at +0.
            if ((k0 + BLOCK_K) % K_CHUNK == 0) | (k0 + BLOCK_K >= K):
                total += acc
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:
        chunks = tl.cdiv(K, K_CHUNK)
        part_ptrs = (part_ptr + (batch * chunks + tl.program_id(2)) * M * N
                     + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :])
        tl.store(part_ptrs, acc, mask=y_mask)
    else:
        if HAS_BIAS:
            # After the full K sum, in fp32 (bf16/fp16 -> fp32 is exact).
            total += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        y_ptrs = y_ptr + batch * stride_yb + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)  # one rounding (RTNE)


@triton.jit
def _chunk_combine_kernel(part_ptr, bias_ptr, y_ptr, M, N, chunks, stride_yb, stride_ym,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[b, m, n] = round(((-0.0 + part[b, 0]) + part[b, 1]) + ... (+ bias[n])): the fused
    kernel's total, in the same order, from the split kernel's chunk sums."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    batch = tl.program_id(1).to(tl.int64)
    mask = offs < M * N
    total = tl.full((BLOCK,), -0.0, dtype=tl.float32)
    for c in range(0, chunks):
        total += tl.load(part_ptr + (batch * chunks + c) * M * N + offs, mask=mask, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        total += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + batch * stride_yb + row * stride_ym + col, total.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------
# Launch configurations

class MatmulConfig(NamedTuple):
    """Output tile and schedule of one launch (BLOCK_K is the contract's, per dtype)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

#: One config per dtype, used for every M on architectures without a verified bucket table.
#: 128x128x64 with 8 warps (two warpgroups) is a good H100/H200 bf16/fp16 tile; fp32 runs on the
#: FMA units (IEEE, no tensor cores), where a 64x64 tile keeps registers in check.
DEFAULT_CONFIG = {
    "bfloat16": MatmulConfig(block_m=128, block_n=128, num_warps=8, num_stages=4, group_m=8),
    "float16": MatmulConfig(block_m=128, block_n=128, num_warps=8, num_stages=4, group_m=8),
    "float32": MatmulConfig(block_m=64, block_n=64, num_warps=4, num_stages=3, group_m=8),
}


def _same_for_16bit(buckets):
    return {"bfloat16": buckets, "float16": buckets}


#: Candidate M buckets per architecture and dtype: ``[(max_M, config), ...]`` in increasing max_M;
#: M above the last bucket uses DEFAULT_CONFIG. Small M wants narrow tiles so that enough programs
#: stream the weight (decode is bandwidth-bound: N=4096 in 128-wide tiles is only 32 programs).
#: sm_90 candidates keep BLOCK_M a multiple of 64 with 4-warp groups (the same wgmma family as
#: the default tile); sm_80 uses mma.sync for every tile. Used only for archs in VERIFIED_ARCHS.
CANDIDATE_BUCKETS = {
    "sm_90": {
        **_same_for_16bit([
            (16, MatmulConfig(block_m=64, block_n=32, num_warps=4, num_stages=6, group_m=1)),
            (128, MatmulConfig(block_m=64, block_n=64, num_warps=4, num_stages=5, group_m=8)),
            (256, MatmulConfig(block_m=128, block_n=64, num_warps=4, num_stages=4, group_m=8)),
        ]),
        "float32": [
            (16, MatmulConfig(block_m=16, block_n=64, num_warps=4, num_stages=4, group_m=1)),
            (64, MatmulConfig(block_m=32, block_n=64, num_warps=4, num_stages=4, group_m=8)),
        ],
    },
    "sm_80": {
        **_same_for_16bit([
            (16, MatmulConfig(block_m=16, block_n=64, num_warps=4, num_stages=5, group_m=1)),
            (64, MatmulConfig(block_m=32, block_n=64, num_warps=4, num_stages=4, group_m=8)),
            (128, MatmulConfig(block_m=64, block_n=64, num_warps=4, num_stages=4, group_m=8)),
        ]),
        "float32": [
            (16, MatmulConfig(block_m=16, block_n=64, num_warps=4, num_stages=4, group_m=1)),
            (64, MatmulConfig(block_m=32, block_n=64, num_warps=4, num_stages=4, group_m=8)),
        ],
    },
    # The test session's exact dot sums k sequentially whatever the tile, so the interpreter
    # exercises the bucket logic itself (small tiles: interpreter time is per program).
    "interpreter": {
        dtype: [
            (16, MatmulConfig(block_m=16, block_n=32, num_warps=4, num_stages=2, group_m=4)),
            (32, MatmulConfig(block_m=32, block_n=64, num_warps=4, num_stages=2, group_m=4)),
            (64, MatmulConfig(block_m=64, block_n=32, num_warps=4, num_stages=2, group_m=4)),
        ] for dtype in DEFAULT_CONFIG
    },
}

#: Architectures whose CANDIDATE_BUCKETS table is used. A GPU arch is added here only after
#: ``bench/gpu_check.sh`` (bucket_equivalence_mismatches) found no difference on that GPU.
VERIFIED_ARCHS = frozenset({"interpreter"})


def _dtype_name(dtype) -> str:
    name = _DTYPE_NAMES.get(dtype, dtype)
    if name not in DEFAULT_CONFIG:
        raise TypeError(f"triton matmul supports bfloat16, float16 and float32, got {dtype}")
    return name


def matmul_config(dtype, M: int, arch: str) -> MatmulConfig:
    """The launch config for `M` rows of `dtype` on `arch`: the verified bucket table, else the default."""
    name = _dtype_name(dtype)
    if arch in VERIFIED_ARCHS:
        for max_m, config in CANDIDATE_BUCKETS.get(arch, {}).get(name, ()):
            if M <= max_m:
                return config
    return DEFAULT_CONFIG[name]


def _fit_stages(config: MatmulConfig, block_k: int, elem_size: int, device: torch.device) -> int:
    """Fewer pipeline stages where the device's shared memory cannot hold them (e.g. 100 KiB GPUs).
    A function of the device only; stages change when data arrives, never the arithmetic."""
    if device.type != "cuda":
        return config.num_stages
    # Headroom for what Triton keeps beside the operand buffers (barriers, epilogue scratch).
    limit = _shared_memory_bytes(device.index if device.index is not None else torch.cuda.current_device()) - 4096
    per_stage = (config.block_m + config.block_n) * block_k * elem_size
    stages = config.num_stages
    while stages > 2 and stages * per_stage > limit:
        stages -= 1
    return stages


_SHARED_MEMORY: dict[int, int] = {}


def _shared_memory_bytes(index: int) -> int:
    if index not in _SHARED_MEMORY:
        props = triton.runtime.driver.active.utils.get_device_properties(index)
        _SHARED_MEMORY[index] = int(props["max_shared_mem"])
    return _SHARED_MEMORY[index]


# ------------------------------------------------------------------------------------------
# Launchers

def _check_operand(what: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"triton {what}: expected a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"triton {what} must be {ndim}-d, got shape {tuple(t.shape)} ({t.dtype})")
    if t.dtype not in _DTYPE_NAMES:
        raise TypeError(f"triton {what} must be bfloat16, float16 or float32, got {t.dtype} (shape {tuple(t.shape)})")
    if t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"triton {what} needs a contiguous last dim, got shape {tuple(t.shape)} strides {t.stride()}")


def _check_pair(op: str, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> None:
    if b.dtype != a.dtype:
        raise TypeError(f"triton {op}: operand dtypes differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    if a.size(-1) != b.size(-1):
        raise ValueError(f"triton {op}: K differs: {tuple(a.shape)} vs {tuple(b.shape)} (both [..., K])")
    if out_dtype not in (a.dtype, torch.float32):
        raise TypeError(f"triton {op}: out_dtype must be {a.dtype} or torch.float32, got {out_dtype}")


_MAX_GRID_Y = 65535
#: Stand-in SM count under the interpreter: small, so that tiny test shapes cross the fused/split
#: switch the way decode shapes do on a GPU.
_INTERPRETER_SMS = 8
_COMBINE_BLOCK = 1024


def use_split(tiles: int, batches: int, K: int, device: torch.device) -> bool:
    """Split-parallel chunks when K has several and the output tiles fill at most half of the SMs.
    Wave model (one 128x128 program per SM): fused takes one wave of full-K programs; split takes
    ceil(tiles x chunks / SMs) waves of 1/chunks the work, at least 2x faster below half the SMs
    and no faster near a full wave, where the partials' extra traffic would only cost. A function
    of the shapes and the device; either way the bits are the same (tested)."""
    chunks = triton.cdiv(K, contract.GPU_MATMUL_K_CHUNK)
    return chunks > 1 and 2 * tiles * batches <= _launch.sm_count(device, interpreter=_INTERPRETER_SMS)


def _run(x, w, bias, y, batches: int, M: int, N: int, K: int, strides, config: MatmulConfig | None,
         split: bool | None = None) -> None:
    if batches == 0 or M == 0 or N == 0:
        return
    if K == 0:  # the empty sum is +0 (the kernels' -0.0 start would leak its sign)
        y.copy_(torch.zeros((), device=y.device) if bias is None else bias.float().expand(y.shape))
        return
    if x.device.type == "cpu":
        interpreter.require_exact_dot("linear")
    name = _dtype_name(x.dtype)
    block_k = contract.GPU_MATMUL_BLOCK_K[name]
    k_chunk = contract.GPU_MATMUL_K_CHUNK
    cfg = config if config is not None else matmul_config(x.dtype, M, _launch.arch_key(x.device))
    stages = _fit_stages(cfg, block_k, x.element_size(), x.device)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    chunks = triton.cdiv(K, k_chunk)
    if split is None:
        split = use_split(tiles, batches, K, x.device)
    meta = dict(HAS_BIAS=bias is not None, EVEN_K=K % block_k == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=block_k, K_CHUNK=k_chunk, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=stages,
                enable_fp_fusion=False)
    # The batch is grid axis 1 (at most 65535 on CUDA): very large batches go in slices.
    for start in range(0, batches, _MAX_GRID_Y):
        count = min(batches, start + _MAX_GRID_Y) - start
        xs, ws, ys = (x, w, y) if count == batches else (x[start:start + count], w[start:start + count],
                                                         y[start:start + count])
        bias_arg = ys if bias is None else bias
        if not split:
            _nt_matmul_kernel[(tiles, count, 1)](xs, ws, bias_arg, ys, ys, M, N, K, *strides, SPLIT=False, **meta)
            continue
        part = torch.empty((count, chunks, M, N), dtype=torch.float32, device=x.device)
        _nt_matmul_kernel[(tiles, count, chunks)](xs, ws, bias_arg, ys, part, M, N, K, *strides, SPLIT=True, **meta)
        _chunk_combine_kernel[(triton.cdiv(M * N, _COMBINE_BLOCK), count)](
            part, bias_arg, ys, M, N, chunks, strides[6], strides[7], HAS_BIAS=bias is not None,
            BLOCK=_COMBINE_BLOCK, num_warps=4, enable_fp_fusion=False)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
           *, _config: MatmulConfig | None = None, _split: bool | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias [N], weight dtype or fp32) -> [M, N] in out_dtype.
    ``_config`` forces a launch config (tests, acceptance script), otherwise :func:`matmul_config`;
    ``_split`` forces the split (True) or fused (False) realisation, otherwise :func:`use_split`."""
    _launch.check_device("linear", x, weight, bias)
    _check_operand("linear x", x, 2)
    _check_operand("linear weight", weight, 2)
    _check_pair("linear", x, weight, out_dtype)
    M, K = x.shape
    N = weight.size(0)
    if bias is not None:
        if bias.dim() != 1 or bias.size(0) != N or bias.dtype not in (weight.dtype, torch.float32):
            raise ValueError(f"triton linear: bias must be [{N}] of {weight.dtype} or float32, "
                             f"got shape {tuple(bias.shape)} ({bias.dtype})")
        bias = bias.contiguous()
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    strides = (0, x.stride(0), x.stride(1), 0, weight.stride(0), weight.stride(1), 0, y.stride(0))
    _run(x, weight, bias, y, 1, M, N, K, strides, _config, _split)
    return y


def bmm_nt(a: torch.Tensor, b_t: torch.Tensor, out_dtype: torch.dtype,
           *, _config: MatmulConfig | None = None, _split: bool | None = None) -> torch.Tensor:
    """a [B, M, K] @ b_t[B, N, K].T per batch -> [B, M, N]; each batch has the bits of :func:`linear`."""
    _launch.check_device("bmm_nt", a, b_t)
    _check_operand("bmm_nt a", a, 3)
    _check_operand("bmm_nt b_t", b_t, 3)
    _check_pair("bmm_nt", a, b_t, out_dtype)
    if a.size(0) != b_t.size(0):
        raise ValueError(f"triton bmm_nt: batch sizes differ: a {tuple(a.shape)} vs b_t {tuple(b_t.shape)}")
    B, M, K = a.shape
    N = b_t.size(1)
    y = torch.empty((B, M, N), dtype=out_dtype, device=a.device)
    strides = (a.stride(0), a.stride(1), a.stride(2), b_t.stride(0), b_t.stride(1), b_t.stride(2),
               y.stride(0), y.stride(1))
    _run(a, b_t, None, y, B, M, N, K, strides, _config, _split)
    return y


KERNELS = {"linear": linear, "bmm_nt": bmm_nt}


# ------------------------------------------------------------------------------------------
# Bucket verification (tests; GPU acceptance script)

def bucket_equivalence_mismatches(arch: str, device: torch.device | str, dtype: torch.dtype,
                                  shapes: Sequence[tuple[int, int]] | None = None, rows: int | None = None,
                                  seed: int = 0) -> list[str]:
    """Runs the same rows under every candidate config of `arch` and under DEFAULT_CONFIG and
    compares the fp32 accumulators bitwise (out_dtype=float32: nothing is hidden by a rounding).

    ``shapes`` are ``(N, K)`` pairs (default: Qwen3-8B-like ones with a K tail on CUDA, tiny ones
    under the interpreter); ``rows`` defaults to just past the largest bucket. Returns
    human-readable failures (empty: the table may be listed in VERIFIED_ARCHS for this arch).
    """
    device = torch.device(device)
    name = _dtype_name(dtype)
    buckets = CANDIDATE_BUCKETS.get(arch, {}).get(name, [])
    if not buckets:
        return []  # nothing to verify: such an arch uses DEFAULT_CONFIG for every M anyway
    if shapes is None:
        shapes = ((40, 150),) if device.type == "cpu" else ((4096, 4096), (6144, 4096), (1000, 1000))
    if rows is None:
        rows = buckets[-1][0] + 3
    default = DEFAULT_CONFIG[name]
    failures = []
    gen = torch.Generator().manual_seed(seed)
    for n, k in shapes:
        x = torch.randn(rows, k, generator=gen).to(dtype=dtype, device=device)
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype=dtype, device=device)
        expect = linear(x, w, None, torch.float32, _config=default)
        for max_m, config in buckets:
            got = linear(x, w, None, torch.float32, _config=config)
            differ = (got.view(torch.int32) != expect.view(torch.int32)).any(dim=1)
            if bool(differ.any()):
                diff = (got.double() - expect.double()).abs().max().item()
                failures.append(f"{arch} {name} N={n} K={k}: bucket M<={max_m} {config} differs from the "
                                f"default {default} in {int(differ.sum())}/{rows} rows (max |diff| {diff:.3g})")
    return failures
