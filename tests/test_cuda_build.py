"""The CUDA extension batch_invariant._cuda: build plumbing, Python registration, and the build check.

The build check compiles the extension with nvcc against the CUDA build of torch, which lives in
its own venv (scripts/setup_cuda_env.sh; the test venv has the CPU torch, which cannot build CUDA
extensions). It runs here, as a test, rather than as a separate CI step, so that `pytest tests`
(the documented test command) stays the one command that checks everything, locally as in CI,
and a compile error shows up in the same report, with the compiler's output, as any failure.
.ci/run creates that venv and sets BATCH_INVARIANT_CUDA_VENV and
BATCH_INVARIANT_REQUIRE_CUDA_BUILD=1 (then a missing venv fails instead of skipping). Elsewhere
the test finds the venv setup_cuda_env.sh would use, or skips saying how to get it. Warm runs
reuse the build (scripts/check_cuda_build.py: ~2 s when csrc/ is unchanged).
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from batch_invariant import backends
from batch_invariant.ops import norm, softmax

ROOT = Path(__file__).resolve().parents[1]
CUDA_VENV_ENV = "BATCH_INVARIANT_CUDA_VENV"
REQUIRE_ENV = "BATCH_INVARIANT_REQUIRE_CUDA_BUILD"
BUILD_TIMEOUT_S = 1500

#: kernel name (as the CPU backend registers it) -> function of batch_invariant._cuda
CUDA_KERNELS = {"rms_norm": "rms_norm", "fused_add_rms_norm": "fused_add_rms_norm",
                "log_softmax": "log_softmax", "softmax": "softmax", "mean": "row_mean"}


def _setup_module():
    spec = importlib.util.spec_from_file_location("bi_setup_cuda", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


def _default_cuda_venv() -> Path | None:
    """The venv scripts/setup_cuda_env.sh makes for the current requirements/cuda.txt, if complete."""
    cache = Path(os.environ.get("BATCH_INVARIANT_CACHE", Path.home() / ".cache" / "batch-invariant-kernels"))
    key = hashlib.sha256((ROOT / "requirements" / "cuda.txt").read_bytes()).hexdigest()[:16]
    for venv in sorted(cache.glob(f"cuda-venv-py*-{key}")):
        if (venv / ".complete").is_file():
            return venv
    return None


# ------------------------------------------------------------------------------------------
# The build check (slow when csrc/ changed: ~2.5 min cold on 2 cores; ~2 s warm)

def test_cuda_extension_compiles_imports_and_rejects_cpu_tensors():
    venv = Path(os.environ[CUDA_VENV_ENV]) if os.environ.get(CUDA_VENV_ENV) else _default_cuda_venv()
    required = os.environ.get(REQUIRE_ENV, "0") not in ("", "0")
    if venv is None or not (venv / "bin" / "python").exists():
        msg = (f"no CUDA build venv ({CUDA_VENV_ENV}={os.environ.get(CUDA_VENV_ENV)!r}); create it with "
               "`bash scripts/setup_cuda_env.sh` (CI does, in .ci/run)")
        if required:
            pytest.fail(msg)
        pytest.skip(msg)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    try:
        proc = subprocess.run([str(venv / "bin" / "python"), str(ROOT / "scripts" / "check_cuda_build.py")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the CUDA build check ran past {BUILD_TIMEOUT_S} s:\n{(exc.stdout or '')[-5000:]}")
    out = proc.stdout + proc.stderr
    print(out[-3000:])
    assert proc.returncode == 0, f"CUDA build check failed (exit {proc.returncode}):\n{out[-15000:]}"
    assert "[cuda-build] OK" in out, out[-5000:]


# ------------------------------------------------------------------------------------------
# Plumbing that needs no CUDA venv

def test_setup_cuda_helpers(monkeypatch, tmp_path):
    setup = _setup_module()
    monkeypatch.delenv("BATCH_INVARIANT_EXTENSIONS", raising=False)
    assert setup.requested_extensions() == {"cpu", "cuda"}
    monkeypatch.setenv("BATCH_INVARIANT_EXTENSIONS", "cuda")
    assert setup.requested_extensions() == {"cuda"}
    monkeypatch.setenv("BATCH_INVARIANT_EXTENSIONS", "gpu")
    with pytest.raises(ValueError, match="BATCH_INVARIANT_EXTENSIONS"):
        setup.requested_extensions()
    # CUDA_HOME wins; else the toolkit behind nvcc (through links); else nothing usable
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup.find_cuda_home() == str(tmp_path)
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = setup.find_cuda_home()
    assert home is None or (Path(home) / "include" / "cuda_runtime_api.h").is_file()
    # the library headers of the CUDA torch's nvidia wheels: nvidia/cu<major>/include
    include = tmp_path / "site" / "nvidia" / "cu13" / "include"
    include.mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    fake_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"))
    found = setup.cuda_library_includes(fake_torch)
    assert len(found) == 1 and found[0].endswith(os.path.join("nvidia", "cu13", "include"))
    assert setup.cuda_library_includes(types.SimpleNamespace(version=types.SimpleNamespace(cuda=None))) == []


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU torch's build path")
def test_cpu_torch_builds_only_the_cpu_extension(monkeypatch, capsys):
    """`pip install --no-build-isolation -e .` next to the CPU torch: the CPU extension, and one
    line saying why not the CUDA one; asked for the CUDA one alone, the build stops with the reason."""
    setup = _setup_module()
    for var in ("BATCH_INVARIANT_EXTENSIONS", "BATCH_INVARIANT_SKIP_CUDA_BUILD", "MAX_JOBS", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)  # extensions() sets MAX_JOBS: restored afterwards
    monkeypatch.chdir(ROOT)
    exts, _ = setup.extensions()
    assert [e.name for e in exts] == ["batch_invariant._cpu"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"batch-invariant-kernels: skipping the CUDA extension: torch {torch.__version__} is a CPU build"]
    monkeypatch.setenv("BATCH_INVARIANT_EXTENSIONS", "cuda")
    with pytest.raises(SystemExit, match="cannot build the CUDA extension: .*CPU build"):
        setup.extensions()


def test_cuda_sources_exist_and_are_globbed():
    setup_text = (ROOT / "setup.py").read_text()
    assert 'glob.glob("csrc/cuda/*.cu")' in setup_text and 'glob.glob("csrc/bindings/cuda_*.cpp")' in setup_text
    assert (ROOT / "csrc" / "cuda" / "launch_rows.cu").is_file()
    assert (ROOT / "csrc" / "bindings" / "cuda_module.cpp").is_file()


def _cuda_registrations() -> set[tuple[str, str]]:
    """(kernel name, _cuda function) pairs that the ops modules' _register_cuda() register."""
    from batch_invariant import ops

    pairs = set()
    for module in ops._MODULES:
        if hasattr(module, "_register_cuda"):
            src = inspect.getsource(module._register_cuda)
            pairs |= set(re.findall(r'register_kernel\("cuda", "(\w+)", ext\.(\w+)\)', src))
    return pairs


def test_bindings_define_what_python_registers():
    """Every `_cuda` function the ops modules register is defined by the pybind module (a missing
    one would surface only at run time on a GPU), with the CPU module's argument names."""
    cuda_src = (ROOT / "csrc" / "bindings" / "cuda_module.cpp").read_text()
    cuda_defs = dict(re.findall(r'm\.def\("(\w+)", &cuda::\w+((?:,\s*"\w+"_a)*)', cuda_src))
    cpu_defs = dict(re.findall(r'm\.def\("(\w+)", &cpu::\w+((?:,\s*"\w+"_a)*)',
                               (ROOT / "csrc" / "bindings" / "cpu_module.cpp").read_text()))
    registered = _cuda_registrations()
    assert set(CUDA_KERNELS.items()) <= registered
    for _, fn in registered:
        assert fn in cuda_defs, f"_register_cuda uses _cuda.{fn}, which cuda_module.cpp does not define"
        if fn in cpu_defs:
            assert re.sub(r"\s", "", cuda_defs[fn]) == re.sub(r"\s", "", cpu_defs[fn]), \
                f"{fn}: argument names differ from the CPU module's"
    assert 'm.def("contract_constants"' in cuda_src


def test_cuda_backend_unavailable_without_the_extension():
    if importlib.util.find_spec("batch_invariant._cuda") is not None:
        pytest.skip("the CUDA extension is installed here")
    reason = backends.backend_unavailable_reason("cuda", "cuda")
    assert reason is not None and "not built" in reason
    assert not backends.has_kernel("cuda", "rms_norm")


class _FakeCudaExtension(types.ModuleType):
    """Stands in for batch_invariant._cuda: any function asked for exists (and is remembered)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        fn = lambda *args: None  # noqa: E731
        fn.fake_name = name
        setattr(self, name, fn)
        return fn


def _fake_cuda_module():
    ext = _FakeCudaExtension("batch_invariant._cuda")
    ext.__spec__ = importlib.machinery.ModuleSpec("batch_invariant._cuda", None)
    return ext


def test_cuda_loader_registers_extension_and_triton_kernels(monkeypatch):
    """With batch_invariant._cuda importable (a stand-in here), the cuda backend gets the
    extension's kernels under the CPU kernel names, the Triton launchers for every other op (when
    Triton is importable), and auto picks it for CUDA tensors."""
    from batch_invariant import ops

    ext = _fake_cuda_module()
    monkeypatch.setitem(sys.modules, "batch_invariant._cuda", ext)
    monkeypatch.setattr(backends, "_KERNELS", {k: v for k, v in backends._KERNELS.items() if k[0] != "cuda"})
    monkeypatch.setattr(backends, "_loaded", backends._loaded - {"cuda"})
    backends._resolve.cache_clear()
    try:
        assert backends.backend_unavailable_reason("cuda", "cuda") is None
        assert backends._resolve.__wrapped__("auto", "cuda") == "cuda"
        assert backends.has_kernel("cuda", "rms_norm")
        from_ext = {op: fn.fake_name for (b, op), fn in backends._KERNELS.items()
                    if b == "cuda" and hasattr(fn, "fake_name")}
        assert from_ext == dict(_cuda_registrations())
        for op, fn in CUDA_KERNELS.items():
            assert backends._KERNELS[("cuda", op)] is getattr(ext, fn), op
        if importlib.util.find_spec("triton") is not None:
            for name in ops.TRITON_MODULES:
                module = importlib.import_module(f"batch_invariant.triton_kernels.{name}")
                for op, fn in module.KERNELS.items():
                    if op not in from_ext:
                        assert backends._KERNELS[("cuda", op)] is fn, op
            needed = {ops.KERNEL_OF[op] for op in ops.OP_NAMES}
            missing = sorted(op for op in needed if ("cuda", op) not in backends._KERNELS)
            assert not missing, f"ops without a kernel in the cuda backend: {missing}"
    finally:
        backends._resolve.cache_clear()


# ------------------------------------------------------------------------------------------
# On a GPU with the extension installed (skipped elsewhere): bad input -> clear errors

def _cuda_ext_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if backends.backend_unavailable_reason("cuda", "cuda") is not None:
        pytest.skip(backends.backend_unavailable_reason("cuda", "cuda"))
    return backends.cuda_extension()


def test_cuda_launchers_reject_bad_input():
    ext = _cuda_ext_or_skip()
    dev = torch.device("cuda")
    x = torch.randn(4, 64, device=dev, dtype=torch.bfloat16)
    w = torch.ones(64, device=dev, dtype=torch.bfloat16)
    cases = [
        (lambda: ext.rms_norm(x.cpu(), w, 1e-6), r"rms_norm: x must be a CUDA tensor, got shape \[4, 64\], dtype BFloat16, device cpu"),
        (lambda: ext.rms_norm(x, w.cpu(), 1e-6), r"weight must be a CUDA tensor, got shape \[64\]"),
        (lambda: ext.rms_norm(x.int(), w, 1e-6), r"x must be float32, bfloat16 or float16, got shape \[4, 64\], dtype Int"),
        (lambda: ext.rms_norm(x.view(2, 2, 64), w, 1e-6), r"x must be 2-d \[T, H\], got shape \[2, 2, 64\]"),
        (lambda: ext.rms_norm(x, w[:32], 1e-6), r"weight must be 1-d \[H\] with H = 64 .*got shape \[32\]"),
        (lambda: ext.rms_norm(x, w.half(), 1e-6), r"weight dtype must be x's dtype \(BFloat16\) or float32, got .*Half"),
        (lambda: ext.rms_norm(x.t(), w[:4], 1e-6), r"x must have a contiguous last dim"),
        (lambda: ext.fused_add_rms_norm(x, x[:2], w, 1e-6), r"residual must match x in shape and dtype"),
        (lambda: ext.fused_add_rms_norm(x, x.cpu(), w, 1e-6), r"residual must be a CUDA tensor"),
        (lambda: ext.log_softmax(x.cpu(), torch.float32), r"log_softmax: x must be a CUDA tensor"),
        (lambda: ext.softmax(x, torch.float16), r"softmax: out_dtype must be x's dtype \(BFloat16\) or float32, got Half"),
        (lambda: ext.row_mean(x.double(), torch.float32), r"row_mean: x must be float32, bfloat16 or float16, got .*Double"),
    ]
    if torch.cuda.device_count() > 1:
        cases.append((lambda: ext.rms_norm(x, w.to("cuda:1"), 1e-6), r"weight and x must be on the same device"))
    for call, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call()
    # the good call still works after all that
    torch.testing.assert_close(ext.rms_norm(x, w, 1e-6).float(), norm.rms_norm_ref(x, w, 1e-6).float(),
                               atol=2e-2, rtol=2e-2)
