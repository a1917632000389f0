"""Build of batch-invariant-kernels.

Always builds the CPU extension ``batch_invariant._cpu`` (C++, torch cpp_extension + ninja, against
the torch that is installed: install with ``pip install --no-build-isolation .``). Builds the CUDA
extension ``batch_invariant._cuda`` only where nvcc and a CUDA build of torch exist.

Environment:
  BATCH_INVARIANT_SKIP_CUDA_BUILD=1   never build the CUDA extension
  BATCH_INVARIANT_CUDA_ARCHS          ";"-separated targets, default "8.0;9.0a" (9.0a: Hopper wgmma)
  BATCH_INVARIANT_EXTENSIONS          which extensions to build, default "cpu,cuda"; "cuda" alone
                                      builds only the CUDA one and fails (instead of skipping) when
                                      it cannot be built (the CI build check: scripts/check_cuda_build.py)
  MAX_JOBS                            parallel compile jobs (default: from free memory and cores)

The CUDA build needs the library headers (cusparse.h, ...) that ATen/cuda/CUDAContext.h includes and
the slim toolkit lacks: they come from the pip package of the CUDA torch's nvidia wheels
(site-packages/nvidia/cu<major>/include), added after the toolkit's own headers (-isystem).
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


def cuda_library_includes(torch) -> list[str]:
    """The nvidia/cu<major>/include folder of the CUDA torch's pip wheels (nvidia-cuda-runtime,
    nvidia-cusparse, ...), if present: the slim toolkit lacks those library headers."""
    major = (torch.version.cuda or "").split(".")[0]
    spec = importlib.util.find_spec("nvidia") if major else None
    if spec is None or not spec.submodule_search_locations:
        return []
    return [path for base in spec.submodule_search_locations
            if os.path.isdir(path := os.path.join(base, f"cu{major}", "include"))][:1]


def requested_extensions() -> set[str]:
    value = os.environ.get("BATCH_INVARIANT_EXTENSIONS", "cpu,cuda")
    names = {n.strip() for n in value.split(",") if n.strip()}
    if not names or not names <= {"cpu", "cuda"}:
        raise ValueError(f"BATCH_INVARIANT_EXTENSIONS: {value!r}; use a comma-separated subset of cpu,cuda")
    return names


def find_cuda_home() -> str | None:
    """$CUDA_HOME / $CUDA_PATH, else the toolkit of the nvcc on PATH (through links), else
    /usr/local/cuda: the first folder with bin/nvcc and include/cuda_runtime_api.h. (torch's own
    guess, dirname(dirname(which nvcc)), is wrong where nvcc is a wrapper script in /usr/local/bin.)"""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    if nvcc := shutil.which("nvcc"):
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (os.path.isfile(os.path.join(home, "bin", "nvcc"))
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))):
            return home
    return None


def cuda_skip_reason(torch) -> str | None:
    if os.environ.get("BATCH_INVARIANT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "BATCH_INVARIANT_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if find_cuda_home() is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return "no CUDA kernels in csrc/cuda yet"
    return None


def cuda_extension(torch):
    from torch.utils.cpp_extension import CUDAExtension

    archs = os.environ.get("BATCH_INVARIANT_CUDA_ARCHS", "8.0;9.0a")
    arch_flags = cuda_archs_to_flags(archs)
    if not arch_flags:
        raise ValueError("BATCH_INVARIANT_CUDA_ARCHS names no target (e.g. '8.0;9.0a')")
    system_includes = [flag for inc in cuda_library_includes(torch) for flag in ("-isystem", inc)]
    # no -std: torch adds the one its headers need (c++20 from torch 2.13 on), nvcc takes only one
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/bindings/cuda_*.cpp"))
    return CUDAExtension(
        "batch_invariant._cuda", cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", f'-DBI_CUDA_ARCHS="{archs}"', *system_includes],
            # no --use_fast_math: IEEE fp32 division/sqrt and denormals, as the contract asks.
            # --threads: nvcc compiles the targets of one file in parallel (2 cores, sm_80 + sm_90a:
            # 71 s instead of 103 s cold)
            "nvcc": ["-O3", "--threads", str(min(len(arch_flags), os.cpu_count() or 1)), *arch_flags,
                     *system_includes]})


def extensions():
    import torch

    wanted = requested_extensions()
    if "cuda" in wanted and torch.version.cuda and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        if home := find_cuda_home():  # before torch.utils.cpp_extension reads it (at import)
            os.environ["CUDA_HOME"] = home
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    write_contract_header()
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    exts = []
    if "cpu" in wanted:
        cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings/cpu_module.cpp"]
        exts.append(CppExtension("batch_invariant._cpu", cpu_sources,
                                 include_dirs=[os.path.join(ROOT, "csrc")],
                                 extra_compile_args={"cxx": CPU_FLAGS}))
    if "cuda" in wanted:
        reason = cuda_skip_reason(torch)
        if reason is None:
            exts.append(cuda_extension(torch))
        elif wanted == {"cuda"}:
            sys.exit(f"batch-invariant-kernels: cannot build the CUDA extension: {reason}")
        else:
            print(f"batch-invariant-kernels: skipping the CUDA extension: {reason}", file=sys.stderr)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
