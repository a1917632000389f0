"""CUDA build check: compile batch_invariant._cuda from this checkout, then import it and check it.

Run with the python of the CUDA build venv (scripts/setup_cuda_env.sh); tests/test_cuda_build.py
does, and so CI does (.ci/run). Exit status 0 = built, imported and checked; the build log is
printed, so a compile error shows up in the test's failure message.

No GPU is needed: the module is imported and its kernels are called with CPU tensors, which they
must reject with a clear error. Kernel *logic* is tested elsewhere (the CPU SIMT simulator).

Caching (CI runs in a fresh clone, so file times there say nothing):
* the build inputs (setup.py, csrc/ without csrc/generated/, contract.py) are mirrored into a
  staging folder under the cache, ~/.cache/batch-invariant-kernels/cuda-build/<key>/src, copying
  only files whose *content* changed, so unchanged files keep their old times and ninja, with its
  persistent build folder and header dependencies, recompiles only what a change touches;
* a hash of those inputs is recorded after a successful build: the same hash skips the build.
<key> is a hash of the venv, its torch version, nvcc's version and BATCH_INVARIANT_CUDA_ARCHS.
A lock file serialises concurrent checks on one machine.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = "8.0;9.0a"
KEEP_BUILDS = 2  # staging folders kept (other venvs / arch lists), newest first


def log(msg: str) -> None:
    print(f"[cuda-build] {msg}", flush=True)


def build_inputs(root: Path) -> list[str]:
    """Paths (relative to root) that the CUDA build reads."""
    files = ["setup.py", "python/batch_invariant/contract.py"]
    for path in sorted((root / "csrc").rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith("csrc/generated/") and "__pycache__" not in rel:
            files.append(rel)
    return files


def sync(root: Path, src: Path, files: list[str]) -> tuple[str, int]:
    """Mirror `files` into `src` by content; returns (hash of all inputs, number of files copied)."""
    digest, copied = hashlib.sha256(), 0
    wanted = set(files)
    for rel in files:
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        dst = src / rel
        if not dst.is_file() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
            copied += 1
    for path in sorted(src.rglob("*"), reverse=True):  # drop files gone from the checkout
        rel = path.relative_to(src).as_posix()
        if path.is_file() and rel not in wanted and not rel.startswith("csrc/generated/"):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return digest.hexdigest(), copied


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    try:
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"[cuda-build] nvcc not usable ({nvcc}): {exc}")


def build(work: Path, archs: str, force: bool) -> Path:
    import torch

    src, lib, temp = work / "src", work / "lib", work / "temp"
    src.mkdir(parents=True, exist_ok=True)
    inputs_hash, copied = sync(ROOT, src, build_inputs(ROOT))
    stamp = work / "built.sha256"
    built = sorted(glob.glob(str(lib / "batch_invariant" / "_cuda*.so")))
    if not force and built and stamp.is_file() and stamp.read_text() == inputs_hash:
        log(f"up to date (inputs {inputs_hash[:12]} unchanged): {built[0]}")
        return Path(built[0])
    log(f"building for {archs!r} with torch {torch.__version__} in {work} "
        f"({copied} changed input file(s); MAX_JOBS={os.environ.get('MAX_JOBS', 'auto')})")
    stamp.unlink(missing_ok=True)
    env = dict(os.environ, BATCH_INVARIANT_EXTENSIONS="cuda", BATCH_INVARIANT_CUDA_ARCHS=archs)
    env.pop("BATCH_INVARIANT_SKIP_CUDA_BUILD", None)
    # the venv's bin first: its ninja, and its ccache if installed (torch wraps nvcc/c++ with it)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    start = time.monotonic()
    # --force: setuptools would skip the extension when the .so is newer than the .cu/.cpp files,
    # ignoring headers; ninja (depfiles) decides what to recompile, the link is redone.
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--force", "--build-lib", str(lib),
                           "--build-temp", str(temp)], cwd=src, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    (work / "build.log").write_text(proc.stdout)
    if proc.returncode != 0:
        # compiler messages name the staged copy: show checkout-relative paths (csrc/...)
        print(proc.stdout.replace(f"{src}{os.sep}", "")[-20000:], flush=True)
        sys.exit(f"[cuda-build] FAILED: the CUDA extension does not compile (exit {proc.returncode}; "
                 f"full log: {work / 'build.log'})")
    built = sorted(glob.glob(str(lib / "batch_invariant" / "_cuda*.so")))
    if not built:
        print(proc.stdout[-5000:], flush=True)
        sys.exit("[cuda-build] FAILED: the build succeeded but produced no batch_invariant/_cuda*.so")
    stamp.write_text(inputs_hash)
    log(f"built in {time.monotonic() - start:.0f} s: {built[0]}")
    return Path(built[0])


def check_module(so_path: Path, archs: str) -> None:
    """Import the built module without a GPU; check what can be checked without one."""
    import torch

    spec = importlib.util.spec_from_file_location("batch_invariant._cuda", so_path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    sys.modules["batch_invariant._cuda"] = ext

    # the package from this checkout (its triton_kernels/ folder is the subpackage
    # batch_invariant.triton_kernels, as pyproject.toml's package-dir maps it)
    sys.path.insert(0, str(ROOT / "python"))
    import batch_invariant as bi
    from batch_invariant import backends, contract

    bi.__path__.append(str(ROOT))
    constants = ext.contract_constants()
    assert constants == contract.compiled_constants(), (constants, contract.compiled_constants())
    info = ext.build_info()
    assert info["cuda_archs"] == archs, info
    log(f"imported {so_path.name}: contract {constants}, build {info}, "
        f"GPU available: {torch.cuda.is_available()}")

    # kernels reject CPU tensors (the one thing callable without a GPU) with a clear message
    x, w = torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    calls = {
        "rms_norm": lambda: ext.rms_norm(x, w, 1e-6),
        "fused_add_rms_norm": lambda: ext.fused_add_rms_norm(x, x, w, 1e-6),
        "log_softmax": lambda: ext.log_softmax(x, torch.float32),
        "softmax": lambda: ext.softmax(x, torch.bfloat16),
        "row_mean": lambda: ext.row_mean(x, torch.float32),
    }
    for name, call in calls.items():
        try:
            call()
        except RuntimeError as exc:
            msg = str(exc).splitlines()[0]
            assert name in msg and "must be a CUDA tensor" in msg and "[2, 8]" in msg, msg
        else:
            raise AssertionError(f"_cuda.{name} accepted CPU tensors")
    log(f"CPU tensors rejected, e.g.: {msg}")

    # the package's cuda loader registers the extension's kernels under the CPU kernel names
    assert backends.has_kernel("cuda", "rms_norm"), "the cuda loader did not register rms_norm"
    rows = {"rms_norm": ext.rms_norm, "fused_add_rms_norm": ext.fused_add_rms_norm,
            "log_softmax": ext.log_softmax, "softmax": ext.softmax, "mean": ext.row_mean}
    for op, fn in rows.items():
        assert backends._KERNELS[("cuda", op)] is fn, f"cuda kernel for {op} is not _cuda's"
    ext_fns = [v for k, v in vars(ext).items() if not k.startswith("_")]
    cuda_ops = {op: fn for (b, op), fn in backends._KERNELS.items() if b == "cuda"}
    mine = sorted(op for op, fn in cuda_ops.items() if any(fn is f for f in ext_fns))
    others = sorted(op for op in cuda_ops if op not in mine)
    log(f"registered under 'cuda': from _cuda {mine}; from Triton {others}")
    bi.set_backend("cuda")
    try:
        bi.rms_norm(x, w)
    except bi.BackendUnavailableError as exc:
        assert "CUDA tensors only" in str(exc), exc
    else:
        raise AssertionError("the cuda backend ran on CPU tensors")


def prune(base: Path, keep: Path) -> None:
    builds = sorted((p for p in base.iterdir() if p.is_dir() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="build even if the inputs are unchanged")
    args = parser.parse_args()
    import torch

    if torch.version.cuda is None:
        sys.exit(f"[cuda-build] {sys.executable} has a CPU torch ({torch.__version__}); "
                 "use the venv of scripts/setup_cuda_env.sh")
    archs = os.environ.get("BATCH_INVARIANT_CUDA_ARCHS", DEFAULT_ARCHS) or DEFAULT_ARCHS
    cache = Path(os.environ.get("BATCH_INVARIANT_CACHE", Path.home() / ".cache" / "batch-invariant-kernels"))
    base = cache / "cuda-build"
    base.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256("\0".join([sys.prefix, torch.__version__, nvcc_version(), archs]).encode())
    work = base / key.hexdigest()[:16]
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        work.mkdir(exist_ok=True)
        os.utime(work)
        prune(base, work)
        so_path = build(work, archs, args.force)
    check_module(so_path, archs)
    log("OK")


if __name__ == "__main__":
    main()
