"""What computed the numbers: lets two processes (engine and trainer) prove they used the same
backend, ISA path, library and contract versions."""
from __future__ import annotations

import importlib.metadata
import importlib.util

import torch

from . import backends, contract


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(device: str | torch.device = "cpu") -> dict:
    """Resolved backend per op on `device`, CPU ISA path, versions. JSON-serialisable."""
    from . import __version__
    from .ops import KERNEL_OF, OP_NAMES

    device = torch.device(device)
    per_op = {}
    for op in OP_NAMES:
        try:
            name = backends.resolve(device)
            per_op[op] = name if backends.has_kernel(name, KERNEL_OF[op]) else f"{name} (no kernel)"
        except backends.BackendUnavailableError as exc:
            per_op[op] = f"unavailable: {exc}"
    cpu_isa = None
    try:
        ext = backends.cpu_extension()
        cpu_isa = {"active": ext.active_isa(), "detected": ext.detected_isa()}
    except backends.BackendUnavailableError:
        pass
    triton_matmul = None
    if device.type == "cuda" and per_op.get("linear") == "triton":
        from .triton_kernels import _launch
        from .triton_kernels import matmul as triton_matmul_module

        arch = _launch.arch_key(device)
        triton_matmul = {"arch": arch, "m_buckets": arch in triton_matmul_module.VERIFIED_ARCHS}
    return {
        "library_version": __version__,
        "contract_version": contract.CONTRACT_VERSION,
        "device": str(device),
        "configured_backend": backends.get_backend(),
        "ops": per_op,
        "cpu_isa": cpu_isa,
        "torch": str(torch.__version__),
        "triton": _version("triton") if importlib.util.find_spec("triton") else None,
        "triton_matmul": triton_matmul,
        "cuda_extension_built": importlib.util.find_spec("batch_invariant._cuda") is not None,
    }
