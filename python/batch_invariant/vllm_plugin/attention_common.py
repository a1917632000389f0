"""What the CPU and CUDA attention backends of the plugin share: the fail-closed feature check and
the forward / KV write on bi.attention's [num_blocks, block_size, num_kv_heads, head_size] caches
(each backend only says how its vLLM KV buffer maps onto those caches)."""
from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionType

from .layers import BatchInvariantUnsupported

_ops = torch.ops.batch_invariant


def check_supported(impl) -> None:
    """Raise naming everything this attention layer uses that bi.attention does not compute."""
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
    if problems:
        raise BatchInvariantUnsupported("BATCH_INVARIANT=1: unsupported attention: " + ", ".join(problems))


class BIAttentionMixin:
    """Put before vLLM's impl class: ``class Impl(BIAttentionMixin, VllmImpl)``; the subclass
    says how its KV buffer maps onto bi's caches (``bi_caches``) and what a profiling run returns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_supported(self)

    def bi_caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def bi_profile_output(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None:  # profiling / warm-up run
            return self.bi_profile_output(output)
        return forward(self, query, self.bi_caches(kv_cache), attn_metadata, output, output_scale, output_block_scale)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        write_kv(key, value, self.bi_caches(kv_cache), slot_mapping)


def forward(impl, query, caches, attn_metadata, output, output_scale, output_block_scale):
    """Paged causal attention of the batch's actual tokens into ``output`` (vLLM's contract)."""
    if output_scale is not None or output_block_scale is not None:
        raise BatchInvariantUnsupported("quantized attention output is not supported")
    if not attn_metadata.causal:
        raise BatchInvariantUnsupported("non-causal attention is not supported")
    n = attn_metadata.num_actual_tokens
    key_cache, value_cache = caches
    q = query[:n].view(n, impl.num_heads, impl.head_size)
    out = _ops.attention(q, key_cache, value_cache, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                         attn_metadata.block_table, impl.scale)
    output[:n].copy_(out.view(output[:n].shape))
    return output


def write_kv(key, value, caches, slot_mapping) -> None:
    key_cache, value_cache = caches
    n = slot_mapping.shape[0]
    _ops.write_kv_cache(key[:n], value[:n], key_cache, value_cache, slot_mapping)
