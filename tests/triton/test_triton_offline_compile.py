"""Every Triton kernel compiles for the GPUs we target (sm_80, sm_90) without a GPU: no register
spills, shared memory within the arch's limit, one MMA instruction family per (kernel, dtype)
across every launch config (fused/split chunks, every M bucket), wgmma / mma.sync for bf16/fp16
matmul and no tensor cores for fp32 (the contract's IEEE fp32).

The compile runs in a subprocess (this session's kernel modules are interpreted functions), through
the real launchers at Qwen3-8B shapes (triton_kernels/offline_compile.py). ~30 s per arch cold.
With BATCH_INVARIANT_GPU_TRITON (set by .ci/run: a folder holding requirements/gpu-triton.txt) it
also compiles for sm_90 with the Triton version of the GPU acceptance machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _nvidia_backend_reason() -> str | None:
    try:
        import triton
        from triton.backends import backends
    except ImportError:
        return "Triton is not installed"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend"
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        return "this Triton ships no ptxas"
    return None


def _gpu_triton_version() -> str:
    for line in (ROOT / "requirements" / "gpu-triton.txt").read_text().splitlines():
        if line.startswith("triton=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("requirements/gpu-triton.txt pins no triton")


@pytest.fixture(scope="module", params=["sm_90", "sm_80", "sm_90 gpu-triton"])
def compiled(request, tmp_path_factory):
    if os.environ.get("BATCH_INVARIANT_TEST_DEVICE", "cpu") == "cuda":
        pytest.skip("a GPU is here: this suite compiles and runs every kernel for real")
    arch, _, variant = request.param.partition(" ")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # silences Triton 3.9's notice; every launch passes it anyway
    if variant:
        folder = os.environ.get("BATCH_INVARIANT_GPU_TRITON")
        if not folder or not (Path(folder) / "triton").is_dir():
            pytest.skip("BATCH_INVARIANT_GPU_TRITON does not name a folder with the GPU machine's Triton "
                        "(bash scripts/setup_gpu_triton.sh PYTHON makes one; .ci/run does)")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
        env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # another version's cache
    else:
        reason = _nvidia_backend_reason()
        if reason:
            pytest.skip(reason)
    out = tmp_path_factory.mktemp("offline") / f"{arch}.json"
    proc = subprocess.run([sys.executable, "-m", "batch_invariant.triton_kernels.offline_compile",
                           "--arch", arch, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"offline compile for {request.param} crashed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(out.read_text())
    if variant:
        assert report["triton"] == _gpu_triton_version(), report["triton"]
    return arch, report, proc


def test_every_kernel_compiles_without_problems(compiled):
    arch, report, proc = compiled
    assert not report["problems"], "\n".join(report["problems"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    launched = {r["kernel"] for r in report["records"]}
    assert set(report["kernels"]) <= launched, f"never compiled: {sorted(set(report['kernels']) - launched)}"
    assert all(r["registers"] is not None for r in report["records"]), "cuobjdump gave no register counts"


def test_matmul_chunks_compile_both_ways_on_tensor_cores(compiled):
    arch, report, _ = compiled
    from batch_invariant.triton_kernels.offline_compile import MATMUL_MMA

    bf16 = [r for r in report["records"] if r["kernel"] == "_nt_matmul_kernel" and r["dtype"] == "bfloat16"]
    assert {r["constants"]["SPLIT"] for r in bf16} == {True, False}
    assert {r["mma"] for r in bf16} == {MATMUL_MMA[arch]}
    assert any(r["kernel"] == "_chunk_combine_kernel" for r in report["records"])


def test_problem_checks_can_fail():
    """Negative control: spills, too much shared memory, mixed families and TF32 are reported."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from batch_invariant.triton_kernels.offline_compile import CompiledLaunch, problems

    def launch(kernel, dtype, mma, local=0, shared=0):
        return CompiledLaunch(scenario="s", kernel=kernel, dtype=dtype, constants={}, num_warps=4, num_stages=2,
                              shared_bytes=shared, registers=255, local_bytes=local, mma=mma)

    assert not problems([launch("_nt_matmul_kernel", "bfloat16", "wgmma")], "sm_90")
    found = problems([launch("_nt_matmul_kernel", "bfloat16", "wgmma", local=16),
                      launch("_nt_matmul_kernel", "bfloat16", "mma.sync", shared=300_000),
                      launch("_nt_matmul_kernel", "float32", "mma.sync")], "sm_90")
    text = "\n".join(found)
    for expected in ("spills 16 bytes", "300000 bytes of shared memory", "several MMA families",
                     "float32 matmul on sm_90 uses ['mma.sync']"):
        assert expected in text, text
