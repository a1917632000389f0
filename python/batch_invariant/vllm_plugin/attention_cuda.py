"""Attention backend for vLLM 0.32 on CUDA: registered over TRITON_ATTN (the plugin selects that
member at start-up). K/V are written with bi.write_kv_cache and attention is bi.attention, i.e.
the Triton backend's kernels on CUDA tensors (the CUDA extension's when built).

KV layout: TRITON_ATTN's per-layer buffer is, logically, [num_blocks, num_kv_heads, block_size,
2*head_size]; transposed to [num_blocks, block_size, num_kv_heads, 2*head_size] and split on the
last dim it gives the [num_blocks, block_size, num_kv_heads, head_size] key and value caches of
bi.attention as strided views (last dim contiguous), read and written in place.

Unverified on a GPU with vLLM so far (none was at hand): the code path is exercised through the
Triton interpreter in tests/triton/test_triton_vllm_glue.py.
"""
from __future__ import annotations

import torch
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from . import attention_common
from .layers import BatchInvariantUnsupported


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRITON_ATTN buffer [NB, Hk, BS, 2*D] -> key/value caches [NB, BS, Hk, D] (views)."""
    if kv_cache.dim() != 4 or kv_cache.size(-1) != 2 * head_size or kv_cache.stride(-1) != 1:
        raise BatchInvariantUnsupported(
            f"unexpected KV cache buffer: shape {tuple(kv_cache.shape)}, strides {kv_cache.stride()}, "
            f"expected [num_blocks, num_kv_heads, block_size, 2*{head_size}] with a contiguous last dim")
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


class BITritonAttentionImpl(attention_common.BIAttentionMixin, TritonAttentionImpl):
    def bi_caches(self, kv_cache):
        return split_kv_cache(kv_cache, self.head_size)

    def bi_profile_output(self, output):
        return output.fill_(0)  # what TritonAttentionImpl returns for a profiling run

    def fused_rope_kvcache_supported(self):
        return False  # rope runs as its own batch_invariant op


class BITritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TRITON_ATTN"

    @staticmethod
    def get_impl_cls() -> type[BITritonAttentionImpl]:
        return BITritonAttentionImpl
