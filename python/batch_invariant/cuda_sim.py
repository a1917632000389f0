"""The CUDA kernel bodies on the CPU SIMT simulator (test side only).

``csrc/cuda/kernels/*.cuh`` are compiled with g++ ``-DBI_CUDA_SIM`` against the header shim in
``csrc/cuda/sim/`` (fibers for CUDA threads, barriers, emulated warp shuffles / votes, see
``csrc/cuda/sim/sim.h``) into a small pybind11 module, built once per source hash with
``torch.utils.cpp_extension.load`` (ninja) under
``$BATCH_INVARIANT_CACHE`` or ``~/.cache/batch-invariant-kernels``, folder ``cuda-sim-<hash>``
(older folders are pruned: the current one and the newest other one are kept).
The functions here take CPU tensors, allocate outputs like the real CUDA launchers and launch the
kernels with the same grid / block choice (``threads=`` overrides the block size: tests only).

Needs a C++17 compiler, ninja, the CUDA headers ``cuda_fp16.h`` / ``cuda_bf16.h`` (a CUDA toolkit,
or the pip package ``nvidia-cuda-runtime`` / ``nvidia.cu13``) and the source tree (an editable
install or a checkout). :func:`unavailable_reason` says which is missing; a compile error in the
sources is raised by :func:`load`, never reported as "unavailable".

Test support for the CUDA tests (tests/cuda/) also lives here: :func:`randn` (seeded inputs); the
nvcc compile / PTX / spill checks of the kernel headers are in ``batch_invariant.nvcc_check``.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from .models import cache_root

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_SRC = _CSRC / "cuda"
SIM_SRC = CUDA_SRC / "sim"

#: g++ flags of the simulator build: one IEEE operation per _rn wrapper (no contraction, no fast
#: math), and no strict-aliasing assumptions for the 16-byte vector loads of the kernels.
CFLAGS = ("-std=c++17", "-O2", "-DBI_CUDA_SIM", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing",
          "-pthread", "-Wall", "-Wno-unknown-pragmas")

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROW_OPS = {"log_softmax": 0, "softmax": 1, "mean": 2}
_ATTN_PATHS = {"auto": 0, "sequential": 1, "split": 2}  # kernels/attention.cuh AttnPath
_last_attention_path = None
_LINEAR_PATHS = {"auto": 0, "fused": 1, "split": 2}  # kernels/linear_plan.cuh LinearPath
_LINEAR_PATH_NAMES = {v: k for k, v in _LINEAR_PATHS.items()}
_last_linear_path = None
#: the SM count the simulated linear's auto path choice assumes (the device launcher asks the
#: device): small, so that small test shapes cross the split-parallel / fused switch.
SIM_SM_COUNT = 4

_lock = threading.Lock()
_module = None
#: simulator build folders kept besides the current one (the newest by modification time).
KEEP_OLD_BUILDS = 1


def cuda_include_dir() -> Path | None:
    """A folder holding ``cuda_fp16.h`` and ``cuda_bf16.h`` (host-usable half / bfloat16 types)."""
    candidates = []
    if os.environ.get("BATCH_INVARIANT_CUDA_INCLUDE"):
        candidates.append(Path(os.environ["BATCH_INVARIANT_CUDA_INCLUDE"]))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates += [real.parent.parent / "include", Path(nvcc).parent.parent / "include"]
    candidates += [Path("/usr/local/cuda/include")]
    for pkg in ("nvidia.cu13", "nvidia.cuda_runtime"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) / "include" for p in spec.submodule_search_locations]
    for c in candidates:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file() and (c / "vector_types.h").is_file():
            return c
    return None


def _sources() -> list[Path]:
    return sorted(SIM_SRC.glob("*.cpp"))


def unavailable_reason() -> str | None:
    """Why the simulator cannot be built here (a missing tool or header), or None."""
    if not SIM_SRC.is_dir() or not _sources():
        return f"the CUDA sources are not here ({SIM_SRC}): needs a checkout / editable install"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if cuda_include_dir() is None:
        return ("cuda_fp16.h / cuda_bf16.h not found (CUDA toolkit headers: set CUDA_HOME or "
                "BATCH_INVARIANT_CUDA_INCLUDE, or pip install nvidia-cuda-runtime)")
    return None


def _source_hash(include: Path) -> str:
    h = hashlib.sha256()
    # what the simulator compiles: the wrapper header, the kernel bodies, the shim and its module
    files = sorted({CUDA_SRC / "intrinsics.cuh", *(CUDA_SRC / "kernels").rglob("*"), *SIM_SRC.rglob("*"),
                    *(_CSRC / "generated").glob("*.h")})  # the contract constants the kernels include
    files = [p for p in files if p.is_file() and p.suffix in (".cuh", ".h", ".cpp")]
    for p in files:
        h.update(str(p.relative_to(_CSRC)).encode())
        h.update(p.read_bytes())
    for part in (*CFLAGS, str(include), torch.__version__, sys.version.split()[0], os.environ.get("CXX", "c++")):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    include = cuda_include_dir()
    return cache_root() / f"cuda-sim-{_source_hash(include or Path('-'))}"


def load():
    """Builds (first call per source hash, ~15-30 s on 2 cores) and imports the simulator module.

    Raises RuntimeError with the reason when a tool or header is missing (see
    :func:`unavailable_reason`), and the compiler's error when the sources do not compile.
    """
    global _module
    with _lock:
        if _module is not None:
            return _module
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"CUDA simulator unavailable: {reason}")
        from torch.utils.cpp_extension import load as cpp_load

        include = cuda_include_dir()
        digest = _source_hash(include)
        out = cache_root() / f"cuda-sim-{digest}"
        out.mkdir(parents=True, exist_ok=True)
        os.utime(out)  # the newest: another process's current build is the newest *other* one
        _module = cpp_load(name=f"bi_cuda_sim_{digest}", sources=[str(p) for p in _sources()],
                           extra_cflags=list(CFLAGS), extra_include_paths=[str(include)],
                           build_directory=str(out), with_cuda=False, verbose=False)
        prune_builds(out)
        return _module


def prune_builds(keep: Path) -> list[Path]:
    """Removes the ``cuda-sim-*`` folders next to ``keep`` except ``keep`` and the
    :data:`KEEP_OLD_BUILDS` newest others (as scripts/check_cuda_build.py prunes cuda-build/).
    Returns the removed folders. A module already imported from a removed folder keeps working."""
    others = []
    for p in keep.parent.glob("cuda-sim-*"):
        if p.is_dir() and p != keep:
            with contextlib.suppress(OSError):
                others.append((p.stat().st_mtime, p))
    others.sort(reverse=True)
    removed = [p for _, p in others[KEEP_OLD_BUILDS:]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------
# Tensor-level entry points (mirror the CUDA launchers: outputs contiguous, rows = dim 0).

def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the simulator runs on CPU tensors, got {t.device}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-d, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}")
    return t if t.size(1) <= 1 or t.stride(1) == 1 else t.contiguous()


def _weight(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if w.dim() != 1 or w.size(0) != x.size(1) or w.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"weight must be 1-d [{x.size(1)}] of {x.dtype} or float32, got {tuple(w.shape)} {w.dtype}")
    return w.contiguous()


def _threads(threads) -> int:
    return -1 if threads is None else int(threads)


def rms_norm_threads(hidden: int) -> int:
    return load().rms_norm_threads(int(hidden))


def row_softmax_threads(cols: int) -> int:
    return load().row_softmax_threads(int(cols))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, threads: int | None = None) -> torch.Tensor:
    m = load()
    x = _rows(x, "x")
    w = _weight(weight, x)
    out = torch.empty(x.shape, dtype=x.dtype)
    m.rms_norm(x.data_ptr(), x.stride(0), 0, 0, 0, 0, w.data_ptr(), out.data_ptr(), out.stride(0),
               x.size(0), x.size(1), float(eps), DTYPE_CODES[x.dtype], DTYPE_CODES[w.dtype], _threads(threads))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       threads: int | None = None, out: torch.Tensor | None = None,
                       residual_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(z), z)`` with ``z = round(x + residual)``. ``out`` / ``residual_out``
    may be given (e.g. ``x`` / ``residual`` themselves: the in-place use)."""
    m = load()
    x = _rows(x, "x")
    r = _rows(residual, "residual")
    if r.shape != x.shape or r.dtype != x.dtype:
        raise ValueError("residual must match x in shape and dtype")
    w = _weight(weight, x)
    out = torch.empty(x.shape, dtype=x.dtype) if out is None else out
    res_out = torch.empty(x.shape, dtype=x.dtype) if residual_out is None else residual_out
    for t in (out, res_out):
        if t.shape != x.shape or t.dtype != x.dtype or (t.size(1) > 1 and t.stride(1) != 1):
            raise ValueError("out / residual_out must match x and have a contiguous last dim")
    m.rms_norm(x.data_ptr(), x.stride(0), r.data_ptr(), r.stride(0), res_out.data_ptr(), res_out.stride(0),
               w.data_ptr(), out.data_ptr(), out.stride(0), x.size(0), x.size(1), float(eps),
               DTYPE_CODES[x.dtype], DTYPE_CODES[w.dtype], _threads(threads))
    return out, res_out


def _row_op(name: str, x: torch.Tensor, out_dtype, threads) -> torch.Tensor:
    m = load()
    x = _rows(x, "x")
    if out_dtype not in (x.dtype, torch.float32):
        raise TypeError(f"out_dtype must be {x.dtype} or torch.float32, got {out_dtype}")
    shape = (x.size(0),) if name == "mean" else tuple(x.shape)
    out = torch.empty(shape, dtype=out_dtype)
    if name == "mean" and x.size(1) == 0:
        return out.fill_(float("nan"))  # 0 / 0, as the CUDA and CPU launchers
    m.row_op(_ROW_OPS[name], x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0) if out.dim() == 2 else 1,
             x.size(0), x.size(1), DTYPE_CODES[x.dtype], DTYPE_CODES[out_dtype], _threads(threads))
    return out


def log_softmax(x: torch.Tensor, out_dtype: torch.dtype = torch.float32, *, threads: int | None = None) -> torch.Tensor:
    return _row_op("log_softmax", x, out_dtype, threads)


def softmax(x: torch.Tensor, out_dtype: torch.dtype | None = None, *, threads: int | None = None) -> torch.Tensor:
    return _row_op("softmax", x, out_dtype or x.dtype, threads)


def row_mean(x: torch.Tensor, out_dtype: torch.dtype | None = None, *, threads: int | None = None) -> torch.Tensor:
    return _row_op("mean", x, out_dtype or x.dtype, threads)


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' deterministic exp (row_common.cuh) on a float32 tensor."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    load().math_f32(0, x.data_ptr(), out.data_ptr(), x.numel())
    return out


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' deterministic log (row_common.cuh) on a float32 tensor."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    load().math_f32(1, x.data_ptr(), out.data_ptr(), x.numel())
    return out


def attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, query_start_loc: torch.Tensor,
              seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float, *, with_lse: bool = False,
              split: int | None = None, path: str = "auto"):
    """Paged attention forward (kernels/attention.cuh; bf16 / fp16 with head size 64 / 128:
    kernels/attention_mma.cuh, see :func:`attention_kernel`) as the CUDA launcher runs it: returns ``out``
    (contiguous [T, Hq, D], q's dtype) or ``(out, lse)`` with ``with_lse``. ``split`` overrides the
    contract's ATTN_SPLIT (tests only: the negative control). ``path``: ``"auto"`` (the launcher's
    choice by shapes), or forces ``"sequential"`` (splits folded in the block) / ``"split"`` (one block per
    split + the combine kernel); :func:`last_attention_path` says which one ran."""
    global _last_attention_path
    if path not in _ATTN_PATHS:
        raise ValueError(f"path must be one of {sorted(_ATTN_PATHS)}, got {path!r}")
    m = load()
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.device.type != "cpu" or t.dtype not in DTYPE_CODES or t.stride(-1) != 1:
            raise ValueError(f"{name}: CPU float tensor with a contiguous last dim, got {t.dtype} {t.device}")
    if q.dim() != 3 or key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("q must be [T, Hq, D], key_cache / value_cache [NB, BS, Hk, D]")
    if key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise TypeError("q, key_cache and value_cache must share one dtype")
    qsl = query_start_loc.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    bt = block_table.to(torch.int32)
    bt = bt if bt.size(1) <= 1 or bt.stride(1) == 1 else bt.contiguous()
    T_, Hq, D = q.shape
    out = torch.empty((T_, Hq, D), dtype=q.dtype)
    lse = torch.empty((T_, Hq), dtype=torch.float32) if with_lse else None
    ran = m.attention(q.data_ptr(), q.stride(0), q.stride(1), key_cache.data_ptr(), *key_cache.stride()[:3],
                      value_cache.data_ptr(), *value_cache.stride()[:3], qsl.data_ptr(), lens.data_ptr(), bt.data_ptr(),
                      bt.stride(0), T_, lens.size(0), Hq, key_cache.size(2), D, key_cache.size(1), float(scale),
                      DTYPE_CODES[q.dtype], -1 if split is None else int(split), out.data_ptr(),
                      0 if lse is None else lse.data_ptr(), _ATTN_PATHS[path], bt.size(1))
    _last_attention_path = {v: k for k, v in _ATTN_PATHS.items()}[ran]
    return (out, lse) if with_lse else out


def attention_kernel(dtype: torch.dtype, head_size: int) -> str:
    """Which attention kernels the launcher runs for ``dtype`` and ``head_size``: ``"mma"``
    (tensor cores, kernels/attention_mma.cuh) or ``"simt"`` (kernels/attention.cuh); a function of
    the dtype and head size only."""
    return "mma" if load().attention_uses_mma(DTYPE_CODES[dtype], int(head_size)) else "simt"


def last_attention_path() -> str | None:
    """The path the last :func:`attention` call ran: ``"sequential"`` or ``"split"``."""
    return _last_attention_path


@contextlib.contextmanager
def reverse_schedule():
    """Fibers of each block run in reverse thread order inside this context (a kernel with a
    missing barrier gives different bits under the two schedules)."""
    m = load()
    before = m.schedule()
    m.set_schedule(1)
    try:
        yield
    finally:
        m.set_schedule(before)


def last_launch_stats() -> dict:
    return dict(load().last_launch_stats())


def selftest(name: str, threads: int = 64) -> float:
    return load().selftest(name, int(threads))


# ------------------------------------------------------------------------------------------
# linear / bmm_nt (csrc/cuda/kernels/linear.cuh through sim_linear.cpp): the device launcher's
# plan (kernels/linear_plan.cuh: tile, grid, load path, fused vs split-parallel path). Bias is
# passed to the kernel in fp32 (an exact conversion).
#
# ``path``: None reads BATCH_INVARIANT_CUDA_LINEAR_PATH as the device launcher does (unset: auto;
# a bad value raises ValueError); "auto" / "fused" / "split" force it. ``sm_count``: the SM count
# the auto choice assumes (:data:`SIM_SM_COUNT`). :func:`last_linear_path` says which path ran.

def _gemm_operand(t: torch.Tensor, name: str, ndim: int) -> torch.Tensor:
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the simulator runs on CPU tensors, got {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(f"{name}: unsupported dtype {t.dtype}")
    return t if t.size(-1) <= 1 or t.stride(-1) == 1 else t.contiguous()


def linear_block_k(dtype: torch.dtype) -> int:
    """BLOCK_K compiled into linear.cuh for ``dtype`` (must equal contract.GPU_MATMUL_BLOCK_K)."""
    return load().linear_block_k(DTYPE_CODES[dtype])


def linear_k_chunk() -> int:
    """The K chunk compiled into linear.cuh (must equal contract.GPU_MATMUL_K_CHUNK)."""
    return load().linear_k_chunk()


def linear_block_mn(dtype: torch.dtype) -> tuple[int, int]:
    return load().linear_block_m(DTYPE_CODES[dtype]), load().linear_block_n(DTYPE_CODES[dtype])


def _gemm(x3: torch.Tensor, w3: torch.Tensor, bias, out_dtype, path, sm_count) -> torch.Tensor:
    global _last_linear_path
    if path is not None and path not in _LINEAR_PATHS:
        raise ValueError(f"path must be None or one of {sorted(_LINEAR_PATHS)}, got {path!r}")
    m = load()
    if x3.dtype != w3.dtype:
        raise TypeError(f"operands must share a dtype, got {x3.dtype} and {w3.dtype}")
    out_dtype = out_dtype or x3.dtype
    if out_dtype not in (x3.dtype, torch.float32):
        raise TypeError(f"out_dtype must be {x3.dtype} or torch.float32, got {out_dtype}")
    B, M, K = x3.shape
    N = w3.size(1)
    if w3.size(0) != B or w3.size(2) != K:
        raise ValueError(f"shapes do not match: {tuple(x3.shape)} and {tuple(w3.shape)}")
    b = None
    if bias is not None:
        if bias.dim() != 1 or bias.size(0) != N or bias.dtype not in (x3.dtype, torch.float32):
            raise ValueError(f"bias must be 1-d [{N}] of {x3.dtype} or float32, got {tuple(bias.shape)} {bias.dtype}")
        b = bias.to(torch.float32).contiguous()
    out = torch.empty((B, M, N), dtype=out_dtype)
    ran = m.linear(x3.data_ptr(), x3.stride(1), x3.stride(0), w3.data_ptr(), w3.stride(1), w3.stride(0),
                   0 if b is None else b.data_ptr(), out.data_ptr(), out.stride(1), out.stride(0), B, M, N, K,
                   DTYPE_CODES[x3.dtype], DTYPE_CODES[out_dtype], -1 if path is None else _LINEAR_PATHS[path],
                   int(sm_count))
    _last_linear_path = _LINEAR_PATH_NAMES[ran]
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, *, path: str | None = None,
           sm_count: int = SIM_SM_COUNT) -> torch.Tensor:
    """x [M, K] (any row stride, inner dim contiguous) @ weight [N, K]^T (+ bias) -> [M, N]."""
    x = _gemm_operand(x, "x", 2)
    w = _gemm_operand(weight, "weight", 2)
    return _gemm(x.unsqueeze(0), w.unsqueeze(0), bias, out_dtype, path, sm_count)[0]


def bmm_nt(a: torch.Tensor, b_t: torch.Tensor, out_dtype: torch.dtype | None = None, *, path: str | None = None,
           sm_count: int = SIM_SM_COUNT) -> torch.Tensor:
    """a [B, M, K] @ b_t [B, N, K]^T -> [B, M, N] (each batch as :func:`linear`)."""
    return _gemm(_gemm_operand(a, "a", 3), _gemm_operand(b_t, "b_t", 3), None, out_dtype, path, sm_count)


def linear_plan(dtype: torch.dtype, M: int, N: int, K: int, *, batches: int = 1, path: str = "auto",
                sm_count: int = SIM_SM_COUNT) -> dict:
    """The device launcher's plan for these shapes (kernels/linear_plan.cuh), computed without
    running anything: ``path`` ("fused" / "split": the one that would run), ``m_tiles``,
    ``n_tiles``, ``chunks``, ``ws_floats``, ``combine_blocks``, ``error`` ("" or why it cannot run)."""
    d = dict(load().linear_plan(DTYPE_CODES[dtype], _LINEAR_PATHS[path], batches, M, N, K, int(sm_count)))
    return {**d, "path": _LINEAR_PATH_NAMES[d["path"]]}


def last_linear_path() -> str | None:
    """The path the last :func:`linear` / :func:`bmm_nt` call ran: ``"fused"`` or ``"split"``."""
    return _last_linear_path


# ------------------------------------------------------------------------------------------
# Test support: seeded inputs.

def randn(shape, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard normal values times ``scale``, rounded to ``dtype`` (CPU)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


#: unit roundoff (half an ulp of 1) per dtype.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
