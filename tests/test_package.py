"""Packaging properties: lazy imports, backend selection, provenance, the triton_kernels guard."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batch_invariant as bi
from batch_invariant import backends

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_import_is_light():
    code = ("import sys, batch_invariant as bi; heavy = [m for m in ('batch_invariant.trainer', "
            "'batch_invariant.vllm_plugin', 'batch_invariant.cli', 'vllm', 'triton', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = _python(code, env={"TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_import_works_without_the_extension(tmp_path):
    """A missing extension must not break `import batch_invariant`; using the backend explains."""
    code = ("import sys; sys.modules['batch_invariant._cpu'] = None\n"
            "import torch, batch_invariant as bi\n"
            "try:\n    bi.linear(torch.ones(1, 2), torch.ones(3, 2))\n"
            "except bi.BackendUnavailableError as e:\n    print('ERR', e)\n")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "pip install --no-build-isolation" in out.stdout


def test_backend_selection_env_and_api():
    assert bi.get_backend() in ("auto", "cpu", "triton", "cuda")
    bi.set_backend("cpu")
    assert bi.get_backend() == "cpu" and backends.resolve("cpu") == "cpu"
    bi.set_backend("cuda")
    with pytest.raises(bi.BackendUnavailableError, match="CUDA tensors only"):
        bi.linear(torch.ones(1, 2), torch.ones(3, 2))
    bi.set_backend(None)
    with pytest.raises(ValueError, match="unknown"):
        bi.set_backend("tpu")
    out = _python("import torch, batch_invariant as bi\n"
                  "try:\n    bi.rms_norm(torch.ones(2, 4), torch.ones(4))\n"
                  "except bi.BackendUnavailableError as e:\n    print('ERR', e)\n",
                  env={"BATCH_INVARIANT_BACKEND": "triton", "TRITON_INTERPRET": "0"})
    assert "ERR" in out.stdout, out.stderr
    assert "TRITON_INTERPRET" in out.stdout or "pip install" in out.stdout


def test_auto_backend_by_device(monkeypatch):
    """auto: CPU tensors -> cpu (even under the interpreter); CUDA tensors -> the CUDA extension
    when built, else triton. Decided from what is installed, without touching a GPU."""
    assert backends.triton_interpreting()  # conftest: the interpreter is on, and still...
    assert backends.resolve(torch.device("cpu")) == "cpu"
    resolve = backends._resolve.__wrapped__
    real = backends.backend_unavailable_reason
    monkeypatch.setattr(backends, "backend_unavailable_reason",
                        lambda name, dev: "not built" if name == "cuda" else real(name, dev))
    if importlib.util.find_spec("triton") is not None:
        assert resolve("auto", "cuda") == "triton"
    monkeypatch.setattr(backends, "backend_unavailable_reason", lambda name, dev: None)
    assert resolve("auto", "cuda") == "cuda"
    with pytest.raises(bi.BackendUnavailableError, match="no backend for"):
        resolve("auto", "mps")


def test_backend_never_chosen_by_shape():
    for shape in ((1, 8), (4096, 8)):
        assert backends.resolve(torch.empty(shape).device) == "cpu"


def test_provenance_is_complete_and_serialisable():
    p = bi.provenance()
    json.dumps(p)
    assert p["contract_version"] == bi.contract.CONTRACT_VERSION
    assert set(p["ops"]) >= {"linear", "attention", "rms_norm", "log_softmax"}
    if backends.has_kernel("cpu", "linear"):
        assert p["ops"]["linear"] == "cpu"
        assert p["cpu_isa"]["active"] in ("portable", "avx512", "avx512_bf16")


def test_triton_kernels_folder_is_not_a_top_level_module():
    """vLLM probes for a package named `triton_kernels`; ours must never be found as one."""
    assert (ROOT / "triton_kernels").is_dir()
    spec = importlib.util.find_spec("triton_kernels")
    assert spec is None or not str(spec.origin or "").startswith(str(ROOT)), spec
    # even from the repository root (cwd on sys.path), importing it as top-level fails loudly
    out = _python("import triton_kernels", cwd=ROOT)
    assert out.returncode != 0 and "batch_invariant.triton_kernels" in out.stderr
    assert importlib.util.find_spec("batch_invariant.triton_kernels") is not None


def test_vllm_plugin_entry_point_is_noop_without_flag():
    out = _python("import os; os.environ.pop('BATCH_INVARIANT', None)\n"
                  "from batch_invariant.vllm_plugin import register; register(); register(); print('ok')")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    if importlib.util.find_spec("vllm") is None:
        return
    code = ("import batch_invariant.vllm_plugin as p; p.register(); p.register()\n"
            "from vllm.v1.sample.sampler import Sampler\n"
            "print(p._registered, Sampler.compute_logprobs.__module__)")
    out = _python(code, cwd=Path.home(), env={"BATCH_INVARIANT": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "batch_invariant.vllm_plugin.sampler"]


def test_entry_points_declared():
    from importlib.metadata import entry_points
    plugins = [e for e in entry_points(group="vllm.general_plugins") if e.name == "batch_invariant"]
    assert plugins and plugins[0].value == "batch_invariant.vllm_plugin:register"
    scripts = [e for e in entry_points(group="console_scripts") if e.name == "batch-invariant"]
    assert scripts and scripts[0].value == "batch_invariant.cli:main"


def _setup_module():
    spec = importlib.util.spec_from_file_location("bi_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


def test_cuda_build_plumbing(monkeypatch):
    setup = _setup_module()
    assert setup.cuda_archs_to_flags("8.0;9.0a") == ["-gencode=arch=compute_80,code=sm_80",
                                                    "-gencode=arch=compute_90a,code=sm_90a"]
    with pytest.raises(ValueError, match="BATCH_INVARIANT_CUDA_ARCHS"):
        setup.cuda_archs_to_flags("sm80")
    monkeypatch.setenv("BATCH_INVARIANT_SKIP_CUDA_BUILD", "1")
    assert "SKIP_CUDA_BUILD" in setup.cuda_skip_reason(torch)
    monkeypatch.delenv("BATCH_INVARIANT_SKIP_CUDA_BUILD")
    if torch.version.cuda is None:
        assert "CPU build" in setup.cuda_skip_reason(torch)
    assert 1 <= setup.default_max_jobs() <= (os.cpu_count() or 1)
    assert setup._load_contract().render_c_header() == bi.contract.render_c_header()
