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

#: Every custom op this package defines (name -> OpOverloadPacket), for opcheck and audits.
OP_NAMES = ("linear", "matmul", "bmm", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "log_softmax",
            "softmax", "mean", "top_k_top_p_mask", "rotary_embedding", "write_kv_cache", "attention",
            "attention_with_lse", "attention_backward")
