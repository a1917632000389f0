"""The batch-invariant ops: one module per op family, each a functional torch.library custom op
``batch_invariant::<name>`` with a fake implementation, validation and a float64 ``*_ref``."""
from __future__ import annotations

from .. import backends
from . import activation, attention, linear, norm, rope, sampling, softmax

_MODULES = (activation, attention, linear, norm, rope, sampling, softmax)


def _load_cpu_kernels() -> None:
    for module in _MODULES:
        module._register_cpu()


backends.register_loader("cpu", _load_cpu_kernels)

#: Modules of batch_invariant.triton_kernels; each exports KERNELS = {kernel name: launcher}
#: with the signatures of the CPU extension's functions of the same names.
TRITON_MODULES = ("matmul", "norm", "softmax", "elementwise", "sampling", "attention", "attention_bwd")


def _load_triton_kernels() -> None:
    import importlib
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise backends.BackendUnavailableError("the triton backend needs Triton (`pip install 'triton>=3.6'`)")
    for name in TRITON_MODULES:
        module = importlib.import_module(f"batch_invariant.triton_kernels.{name}")
        for op, fn in module.KERNELS.items():
            backends.register_kernel("triton", op, fn)


backends.register_loader("triton", _load_triton_kernels)


def _load_cuda_kernels() -> None:
    """The cuda backend: the kernels of batch_invariant._cuda (modules with a _register_cuda());
    every op the extension does not implement runs the Triton kernel (issue 7: elementwise ops and
    backward reuse Triton), when Triton is importable. The Triton launchers are registered first
    and the extension's kernels then replace theirs."""
    import importlib
    import importlib.util

    backends.cuda_extension()  # not built -> BackendUnavailableError (has_kernel: False)
    if importlib.util.find_spec("triton") is not None:
        for name in TRITON_MODULES:
            module = importlib.import_module(f"batch_invariant.triton_kernels.{name}")
            for op, fn in module.KERNELS.items():
                backends.register_kernel("cuda", op, fn)
    for module in _MODULES:
        register = getattr(module, "_register_cuda", None)
        if register is not None:
            register()


backends.register_loader("cuda", _load_cuda_kernels)

#: Every custom op this package defines (name -> OpOverloadPacket), for opcheck and audits.
OP_NAMES = ("linear", "matmul", "bmm", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "log_softmax",
            "softmax", "mean", "top_k_top_p_mask", "rotary_embedding", "write_kv_cache", "attention",
            "attention_with_lse", "attention_backward")

#: The backend kernel each op runs (the same name, except where ops share a kernel).
KERNEL_OF = {op: {"matmul": "linear", "bmm": "bmm_nt"}.get(op, op) for op in OP_NAMES}
