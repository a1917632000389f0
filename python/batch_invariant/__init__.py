"""batch_invariant: deterministic, batch-invariant kernels for vLLM V1 and a matching trainer.

    import batch_invariant as bi
    y = bi.linear(x, w)                      # the bits of y[i] depend on x[i] and w only

Heavy submodules (``bi.trainer``, ``bi.vllm_plugin``, ``bi.cli``) are imported on first use.
"""
from __future__ import annotations

import importlib

from . import contract
from .backends import BackendUnavailableError, available_backends, get_backend, set_backend
from .mode import batch_invariant_mode, disable, enable, is_enabled
from .ops.activation import silu_and_mul
from .ops.attention import attention, write_kv_cache
from .ops.linear import bmm, linear, matmul
from .ops.norm import fused_add_rms_norm, rms_norm
from .ops.rope import rope_cos_sin_cache, rotary_embedding
from .ops.sampling import apply_temperature, token_logprobs, top_k_top_p_mask
from .ops.softmax import log_softmax, mean, softmax
from .provenance import provenance

__version__ = "0.1.0"

_LAZY = ("trainer", "vllm_plugin", "cli", "ops")

__all__ = [
    "BackendUnavailableError", "apply_temperature", "attention", "available_backends", "batch_invariant_mode",
    "bmm", "contract", "disable", "enable", "fused_add_rms_norm", "get_backend", "is_enabled", "linear",
    "log_softmax", "matmul", "mean", "provenance", "rms_norm", "rope_cos_sin_cache", "rotary_embedding",
    "set_backend", "silu_and_mul", "softmax", "token_logprobs", "top_k_top_p_mask", "write_kv_cache",
]


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
