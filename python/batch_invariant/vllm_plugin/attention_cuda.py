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
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from .layers import BatchInvariantUnsupported

_ops = torch.ops.batch_invariant


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TRITON_ATTN buffer [NB, Hk, BS, 2*D] -> key/value caches [NB, BS, Hk, D] (views)."""
    if kv_cache.dim() != 4 or kv_cache.size(-1) != 2 * head_size or kv_cache.stride(-1) != 1:
        raise BatchInvariantUnsupported(
            f"unexpected KV cache buffer: shape {tuple(kv_cache.shape)}, strides {kv_cache.stride()}, "
            f"expected [num_blocks, num_kv_heads, block_size, 2*{head_size}] with a contiguous last dim")
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def unsupported_features(impl) -> list[str]:
    """What this attention layer uses that bi.attention does not compute (fail closed)."""
    problems = []
    if getattr(impl, "sliding_window", None) not in (-1, None, (-1, -1)):
        problems.append(f"sliding window {impl.sliding_window}")
    if getattr(impl, "alibi_slopes", None) is not None:
        problems.append("ALiBi")
    if getattr(impl, "logits_soft_cap", None) not in (0, 0.0, None):
        problems.append(f"logit soft-cap {impl.logits_soft_cap}")
    if getattr(impl, "sinks", None) is not None:
        problems.append("attention sinks")
    if getattr(impl, "kv_cache_dtype", "auto") not in ("auto", None):
        problems.append(f"kv_cache_dtype {impl.kv_cache_dtype!r}")
    if getattr(impl, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
        problems.append(f"attention type {impl.attn_type}")
    if getattr(impl, "kv_sharing_target_layer_name", None) is not None:
        problems.append("KV sharing between layers")
    return problems


class BITritonAttentionImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problems = unsupported_features(self)
        if problems:
            raise BatchInvariantUnsupported("BATCH_INVARIANT=1: unsupported attention: " + ", ".join(problems))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise BatchInvariantUnsupported("quantized attention output is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output.fill_(0)
        if attn_metadata.causal is not True:
            raise BatchInvariantUnsupported("non-causal attention is not supported")
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = _ops.attention(q, key_cache, value_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                             attn_metadata.block_table, self.scale)
        output[:n].copy_(out.view(output[:n].shape))
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        n = slot_mapping.shape[0]
        _ops.write_kv_cache(key[:n], value[:n], key_cache, value_cache, slot_mapping)

    def fused_rope_kvcache_supported(self):
        return False  # rope runs as its own batch_invariant op


class BITritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TRITON_ATTN"

    @staticmethod
    def get_impl_cls() -> type[BITritonAttentionImpl]:
        return BITritonAttentionImpl
