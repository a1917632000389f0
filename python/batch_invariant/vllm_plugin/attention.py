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
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .layers import BatchInvariantUnsupported

_ops = torch.ops.batch_invariant


def split_kv_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not kv_cache.is_contiguous():
        raise BatchInvariantUnsupported(f"the KV cache buffer must be contiguous, got strides {kv_cache.stride()}")
    blocks, heads, block_size, width = kv_cache.shape
    kv = kv_cache.view(blocks, 2, block_size, heads, width // 2)
    return kv[:, 0], kv[:, 1]


class BIAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        problems = []
        if self.sliding_window not in (-1, None):
            problems.append(f"sliding window {self.sliding_window}")
        if self.alibi_slopes is not None:
            problems.append("ALiBi")
        if self.logits_soft_cap not in (0, 0.0, None):
            problems.append(f"logit soft-cap {self.logits_soft_cap}")
        if self.sinks is not None:
            problems.append("attention sinks")
        if self.kv_cache_dtype not in ("auto", None):
            problems.append(f"kv_cache_dtype {self.kv_cache_dtype!r}")
        if self.attn_type != AttentionType.DECODER:
            problems.append(f"attention type {self.attn_type}")
        if self.kv_sharing_target_layer_name is not None:
            problems.append("KV sharing between layers")
        if problems:
            raise BatchInvariantUnsupported("BATCH_INVARIANT=1: unsupported attention: " + ", ".join(problems))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise BatchInvariantUnsupported("quantized attention output is not supported")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if not attn_metadata.causal:
            raise BatchInvariantUnsupported("non-causal attention is not supported")
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache)
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = _ops.attention(q, key_cache, value_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                             attn_metadata.block_table, self.scale)
        output[:n].copy_(out.view(output[:n].shape))
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache)
        n = slot_mapping.shape[0]
        _ops.write_kv_cache(key[:n], value[:n], key_cache, value_cache, slot_mapping)


class BIAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[BIAttentionImpl]:
        return BIAttentionImpl
