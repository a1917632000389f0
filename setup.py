"""Build of batch-invariant-kernels.

Always builds the CPU extension ``batch_invariant._cpu`` (C++, torch cpp_extension + ninja, against
the torch that is installed: install with ``pip install --no-build-isolation .``). Builds the CUDA
extension ``batch_invariant._cuda`` only where nvcc and a CUDA build of torch exist.

Environment:
  BATCH_INVARIANT_SKIP_CUDA_BUILD=1   never build the CUDA extension
  BATCH_INVARIANT_CUDA_ARCHS          ";"-separated targets, default "8.0;9.0a" (9.0a: Hopper wgmma)
  MAX_JOBS                            parallel compile jobs (default: from free memory and cores)
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
GENERATED = os.path.join(ROOT, "csrc", "generated")
CPU_FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fopenmp",
             "-Wall", "-Wno-unused-function", "-Wno-sign-compare", "-Wno-maybe-uninitialized"]


def _load_contract():
    # Import contract.py by path: the package itself must not be imported at build time.
    spec = importlib.util.spec_from_file_location(
        "_bi_contract", os.path.join(ROOT, "python", "batch_invariant", "contract.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_contract_header() -> None:
    os.makedirs(GENERATED, exist_ok=True)
    text = _load_contract().render_c_header()
    path = os.path.join(GENERATED, "bi_contract.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def default_max_jobs() -> int:
    """One job per ~2 GiB of available memory (nvcc peaks there), at most one per core."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f}
        by_memory = max(1, info.get("MemAvailable", 0) // (2 * 1024 * 1024))
    except OSError:
        by_memory = 1
    return max(1, min(os.cpu_count() or 1, by_memory))


def cuda_archs_to_flags(spec: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in spec.split(";"))):
        num = arch.replace(".", "")
        if not num.rstrip("a").isdigit():
            raise ValueError(f"BATCH_INVARIANT_CUDA_ARCHS: bad target {arch!r} (e.g. '8.0;9.0a')")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def cuda_skip_reason(torch) -> str | None:
    if os.environ.get("BATCH_INVARIANT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "BATCH_INVARIANT_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return "no CUDA kernels in csrc/cuda yet"
    return None


def extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    write_contract_header()
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings/cpu_module.cpp"]
    exts = [CppExtension("batch_invariant._cpu", cpu_sources,
                         include_dirs=[os.path.join(ROOT, "csrc")],
                         extra_compile_args={"cxx": CPU_FLAGS})]
    reason = cuda_skip_reason(torch)
    if reason is None:
        from torch.utils.cpp_extension import CUDAExtension
        archs = os.environ.get("BATCH_INVARIANT_CUDA_ARCHS", "8.0;9.0a")
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/bindings/cuda_*.cpp"))
        exts.append(CUDAExtension(
            "batch_invariant._cuda", cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": ["-O3", "-std=c++17", *cuda_archs_to_flags(archs)]}))
    else:
        print(f"batch-invariant-kernels: skipping the CUDA extension: {reason}", file=sys.stderr)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
