"""Compile the Triton kernels for a GPU architecture on a machine without a GPU (nothing runs).

CI has no GPU: the interpreter tests prove the kernels' arithmetic, not that they compile for a
real target, fit its registers and shared memory, or get the tensor-core instruction family the
contract relies on (one family for every tile config of a dtype: the static half of the M-bucket
check; the bitwise half needs the GPU, ``bench/gpu_check.sh``). Here the real launchers are driven
with CPU tensors of GPU size (Qwen3-8B shapes) while Triton is told the device is ``arch``: every
launch is compiled (PTX and cubin, with Triton's own ptxas) and recorded instead of run. Output
buffers stay unwritten; no launcher reads them back.

    python -m batch_invariant.triton_kernels.offline_compile --arch sm_90 [--json FILE]

Needs a process without TRITON_INTERPRET (the kernels must be JIT functions, not interpreted).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import triton

from .. import backends, contract
from . import _launch, interpreter

#: arch -> (compute capability, SMs, max shared memory per block in bytes) of the GPUs we target:
#: A100 (sm_80) and H100/H200 (sm_90).
ARCHS = {"sm_80": (80, 108, 166912), "sm_90": (90, 132, 232448)}
#: The tensor-core instruction family each arch's bf16/fp16 matmul must use for every config.
MATMUL_MMA = {"sm_80": "mma.sync", "sm_90": "wgmma"}


@dataclasses.dataclass
class CompiledLaunch:
    scenario: str
    kernel: str
    dtype: str  # of the launch's first floating-point tensor (the operands)
    constants: dict  # the launch's constexpr keyword arguments (BLOCK_M, SPLIT, ...)
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None  # from cuobjdump; None where no cuobjdump is found
    local_bytes: int | None  # spill space per thread (ptxas "LOCAL"); 0 = no spills
    mma: str  # "wgmma", "mma.sync" or "none"

    def describe(self) -> str:
        consts = " ".join(f"{k}={v}" for k, v in self.constants.items() if not k.startswith("HAS_"))
        return f"{self.kernel} [{self.scenario}] {consts} warps={self.num_warps} stages={self.num_stages}"


class Recording:
    """The launches compiled inside :func:`compile_only`, labelled with the current scenario."""

    def __init__(self):
        self.launches: list[CompiledLaunch] = []
        self.scenario = ""


class _CompileOnlyDriver:
    """The few driver calls JITFunction.run makes before it would launch."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _mma_family(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    return "mma.sync" if re.search(r"\bmma\.sync\b", ptx) else "none"


def _jit_functions():
    """The JIT functions of the backend's kernel modules (kernels and the helpers they call)."""
    import importlib

    from triton.runtime.jit import JITFunction

    from ..ops import TRITON_MODULES

    return [obj for name in TRITON_MODULES for obj in vars(importlib.import_module(f"{__package__}.{name}")).values()
            if isinstance(obj, JITFunction)]


@contextlib.contextmanager
def compile_only(arch: str) -> Iterator[Recording]:
    """Within this context Triton launches compile for `arch` and are recorded, never run; CPU
    tensors stand for device tensors. Everything patched is restored on exit."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if backends.triton_interpreting():
        raise RuntimeError("offline compilation needs a process without TRITON_INTERPRET (the kernel modules "
                           "were imported as interpreted functions)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import jit
    from triton.runtime.driver import driver

    capability, sms, _ = ARCHS[arch]
    recording = Recording()
    original_run = jit.JITFunction.run

    def compile_and_record(fn, *args, grid, warmup, **kwargs):
        kernel = original_run(fn, *args, grid=grid, warmup=True, **kwargs)
        usage = _resource_usage(kernel.asm["cubin"])
        dtype = next((str(a.dtype).removeprefix("torch.") for a in args
                      if isinstance(a, torch.Tensor) and a.is_floating_point()), "")
        recording.launches.append(CompiledLaunch(
            scenario=recording.scenario, kernel=fn.__name__, dtype=dtype,
            constants={k: v for k, v in kwargs.items() if k.isupper()},
            num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
            shared_bytes=kernel.metadata.shared, registers=usage.get("REG"), local_bytes=usage.get("LOCAL"),
            mma=_mma_family(kernel.asm["ptx"])))
        return kernel

    patches = [(jit.JITFunction, "run", compile_and_record),
               (backends, "triton_interpreting", lambda: True),  # CPU tensors accepted by check_device
               (interpreter, "is_active", lambda: True),  # no interpreter involved: nothing to patch
               (_launch, "arch_key", lambda device: arch),
               (_launch, "device_sms", lambda device: sms)]
    saved = [(obj, name, obj.__dict__[name]) for obj, name, _ in patches]
    saved_driver = driver._active

    def clear_caches():  # compiled kernels are cached per device index, whatever the target
        for fn in _jit_functions():
            fn.device_caches.clear()

    clear_caches()
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", capability, 32)))
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield recording
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        driver._active = saved_driver
        clear_caches()


# ------------------------------------------------------------------------------------------
# What is compiled: the launches of a Qwen3-8B forward / backward and the sampler

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD = 4096, 12288, 151936, 32, 8, 128


def _scenarios(arch: str) -> dict[str, Callable[[], object]]:
    from . import attention, attention_bwd, elementwise, matmul, norm, sampling, softmax

    bf16, f32 = torch.bfloat16, torch.float32
    empty = lambda *shape, dtype=bf16: torch.empty(shape, dtype=dtype)  # noqa: E731  (values unused)
    w = empty(HIDDEN, HIDDEN)
    out: dict[str, Callable[[], object]] = {
        "linear bf16 M=1": lambda: matmul.linear(empty(1, HIDDEN), w, None, bf16),
        "linear bf16 M=64 bias fp32-out": lambda: matmul.linear(empty(64, HIDDEN), w, empty(HIDDEN, dtype=f32), f32),
        "linear bf16 M=2048": lambda: matmul.linear(empty(2048, HIDDEN), w, None, bf16),
        "linear bf16 M=2048 K=4100": lambda: matmul.linear(empty(2048, 4100), empty(HIDDEN, 4100), None, bf16),
        "linear fp16 M=2048": lambda: matmul.linear(empty(2048, HIDDEN, dtype=torch.float16),
                                                    empty(HIDDEN, HIDDEN, dtype=torch.float16), None, torch.float16),
        "linear fp32 M=1": lambda: matmul.linear(empty(1, HIDDEN, dtype=f32), empty(HIDDEN, HIDDEN, dtype=f32),
                                                 None, f32),
        "lm_head fp32 M=64": lambda: matmul.linear(empty(64, HIDDEN, dtype=f32), empty(VOCAB, HIDDEN, dtype=f32),
                                                   None, f32),
        "bmm_nt bf16": lambda: matmul.bmm_nt(empty(8, 128, HEAD), empty(8, 128, HEAD), f32),
        "rms_norm bf16": lambda: norm.rms_norm(empty(64, HIDDEN), empty(HIDDEN), 1e-6),
        "fused_add_rms_norm bf16": lambda: norm.fused_add_rms_norm(empty(64, HIDDEN), empty(64, HIDDEN),
                                                                   empty(HIDDEN), 1e-6),
        "log_softmax fp32 vocab": lambda: softmax.log_softmax(empty(8, VOCAB, dtype=f32), f32),
        "softmax fp32 vocab": lambda: softmax.softmax(empty(8, VOCAB, dtype=f32), f32),
        "mean bf16": lambda: softmax.mean(empty(8, HIDDEN), f32),
        "silu_and_mul bf16": lambda: elementwise.silu_and_mul(empty(64, 2 * INTERMEDIATE)),
        "top_k_top_p_mask vocab": lambda: sampling.top_k_top_p_mask(
            empty(8, VOCAB, dtype=f32), torch.full((8,), 50, dtype=torch.int64), torch.full((8,), 0.9)),
    }
    # Every candidate M bucket of this arch (their instruction family is checked here; their bits
    # on the GPU by bench/gpu_check.sh), fused and split.
    for name, buckets in matmul.CANDIDATE_BUCKETS.get(arch, {}).items():
        dtype = getattr(torch, name)
        for max_m, config in buckets:
            for split in (False, True):
                out[f"linear {name} bucket M<={max_m} split={split}"] = (
                    lambda dtype=dtype, max_m=max_m, config=config, split=split: matmul.linear(
                        empty(max_m, HIDDEN, dtype=dtype), empty(HIDDEN, HIDDEN, dtype=dtype), None, dtype,
                        _config=config, _split=split))

    cos_sin = torch.randn(8192, HEAD)
    out["rotary_embedding"] = lambda: elementwise.rotary_embedding(
        torch.arange(64), empty(64, HEADS * HEAD), empty(64, KV_HEADS * HEAD), HEAD, cos_sin, True)
    page, pages = 16, 4096 // 16 + 1
    kc, vc = empty(8 * pages, page, KV_HEADS, HEAD), empty(8 * pages, page, KV_HEADS, HEAD)
    out["write_kv_cache"] = lambda: elementwise.write_kv_cache(empty(8, KV_HEADS, HEAD), empty(8, KV_HEADS, HEAD),
                                                               kc, vc, torch.arange(8) * page)
    table = torch.arange(8 * pages, dtype=torch.int32).view(8, pages)
    i32 = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    decode = (i32(list(range(9))), i32([4096] * 8), table)
    prefill = (i32([0, 2048]), i32([2048]), table[:1])
    for split_parallel in (False, True):
        out[f"attention decode bf16 split_parallel={split_parallel}"] = (
            lambda sp=split_parallel: attention.attention(empty(8, HEADS, HEAD), kc, vc, *decode, HEAD ** -0.5,
                                                          _split_parallel=sp))
    out["attention_with_lse prefill bf16"] = lambda: attention.attention_with_lse(
        empty(2048, HEADS, HEAD), kc, vc, *prefill, HEAD ** -0.5)
    kc32, vc32 = empty(pages, page, KV_HEADS, HEAD, dtype=f32), empty(pages, page, KV_HEADS, HEAD, dtype=f32)
    out["attention prefill fp32"] = lambda: attention.attention(
        empty(2048, HEADS, HEAD, dtype=f32), kc32, vc32, *prefill, HEAD ** -0.5)
    bwd_meta = (i32([0, 512]), i32([512]), table[:1])
    for dtype, (k_cache, v_cache) in ((bf16, (kc, vc)), (f32, (kc32, vc32))):
        q = empty(512, HEADS, HEAD, dtype=dtype)
        out[f"attention_backward {dtype}".replace("torch.", "")] = (
            lambda q=q, k_cache=k_cache, v_cache=v_cache: attention_bwd.attention_backward(
                torch.empty_like(q), q, k_cache, v_cache, torch.empty_like(q), empty(512, HEADS, dtype=f32),
                *bwd_meta, HEAD ** -0.5))
    return out


def compile_all(arch: str, only: str | None = None) -> list[CompiledLaunch]:
    """Compiles every scenario's launches for `arch` (`only`: scenarios whose name contains it)."""
    with compile_only(arch) as recording:
        for name, launch in _scenarios(arch).items():
            if only is None or only in name:
                recording.scenario = name
                launch()
    return recording.launches


def kernel_names() -> set[str]:
    """Every launchable Triton kernel of the backend (the ``*_kernel`` JIT functions)."""
    return {fn.__name__ for fn in _jit_functions() if fn.__name__.endswith("_kernel")}


def problems(records: list[CompiledLaunch], arch: str) -> list[str]:
    """What a GPU of `arch` would reject or run badly, or what breaks the contract's static side."""
    _, _, shared_limit = ARCHS[arch]
    found = []
    for r in records:
        if r.local_bytes:
            found.append(f"{r.describe()}: spills {r.local_bytes} bytes per thread ({r.registers} registers)")
        if r.shared_bytes > shared_limit:
            found.append(f"{r.describe()}: {r.shared_bytes} bytes of shared memory > {shared_limit}")
    # One instruction family per (kernel, dtype) for every config: split/fused, every M bucket.
    families: dict[tuple[str, str], set[str]] = {}
    for r in records:
        families.setdefault((r.kernel, r.dtype), set()).add(r.mma)
    for (kernel, dtype), seen in sorted(families.items()):
        if len(seen) > 1:
            found.append(f"{kernel} {dtype}: several MMA families across its configs: {sorted(seen)}")
    for dtype in ("bfloat16", "float16", "float32"):
        seen = families.get(("_nt_matmul_kernel", dtype))
        expected = {"none" if dtype == "float32" else MATMUL_MMA[arch]}
        if seen and seen != expected:
            found.append(f"{dtype} matmul on {arch} uses {sorted(seen)}, expected {sorted(expected)}"
                         + (" (the contract: IEEE fp32, never TF32)" if dtype == "float32" else ""))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sm_90")
    parser.add_argument("--only", help="compile only the scenarios whose name contains this")
    parser.add_argument("--json", help="write the records and problems here")
    parser.add_argument("--csv", help="write one row per compiled launch here (bench/results/)")
    args = parser.parse_args(argv)
    records = compile_all(args.arch, args.only)
    found = problems(records, args.arch)
    for r in records:
        print(f"{r.registers!s:>4} regs {r.local_bytes!s:>3} spill {r.shared_bytes:>6} smem {r.mma:>8}  {r.describe()}")
    print(f"{len(records)} launches compiled for {args.arch} with Triton {triton.__version__} "
          f"(contract v{contract.CONTRACT_VERSION}); "
          f"{len(found)} problems")
    for p in found:
        print("PROBLEM:", p)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "records": [dataclasses.asdict(r) for r in records],
                                               "problems": found, "kernels": sorted(kernel_names())}, indent=1))
    if args.csv:
        _write_csv(args.csv, records)
    return 1 if found else 0


def _write_csv(path: str, records: list[CompiledLaunch]) -> None:
    import csv

    fields = ["scenario", "kernel", "dtype", "registers", "local_bytes", "shared_bytes", "mma", "num_warps",
              "num_stages", "constants"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in records:
            row = dataclasses.asdict(r)
            row["constants"] = " ".join(f"{k}={v}" for k, v in r.constants.items())
            writer.writerow(row)


if __name__ == "__main__":
    sys.exit(main())
