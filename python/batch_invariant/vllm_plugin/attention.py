"""Attention backend for vLLM 0.32 on CPU: registered over CPU_ATTN (the CPU platform always
picks that member). K/V are written with bi.write_kv_cache, attention is bi.attention; both read
the engine's per-layer KV buffer in place.

KV layout: vLLM hands each layer a contiguous [num_blocks, num_kv_heads, block_size, 2*head_size]
buffer. Nothing but this backend reads its contents, so we use our own convention per block:
[2, block_size, num_kv_heads, head_size] (the K block, then the V block), i.e. the
[num_blocks, block_size, num_kv_heads, head_size] caches of bi.attention with a block stride.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from . import attention_common
from .layers import BatchInvariantUnsupported


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not kv_cache.is_contiguous():
        raise BatchInvariantUnsupported(f"the KV cache buffer must be contiguous, got strides {kv_cache.stride()}")
    blocks, heads, block_size, width = kv_cache.shape
    kv = kv_cache.view(blocks, 2, block_size, heads, width // 2)
    return kv[:, 0], kv[:, 1]


class BIAttentionImpl(attention_common.BIAttentionMixin, CPUAttentionBackendImpl):
    def bi_caches(self, kv_cache):
        return split_kv_cache(kv_cache)


class BIAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[BIAttentionImpl]:
        return BIAttentionImpl
