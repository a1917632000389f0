"""Paged causal attention (GQA) with vLLM V1 metadata, and the KV-cache write.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_size]`` for keys and values. Query i
of sequence b sits at position ``seq_lens[b] - q_len_b + i`` and attends to keys ``0..pos``. The
reduction order (tiles of ATTN_TILE_N keys, splits of ATTN_SPLIT keys, fixed combine) depends only
on the position, so prefill, chunked prefill and decode give the same bits (contract.py).
New K/V must be written (``write_kv_cache``) before ``attention`` reads them.
"""
from __future__ import annotations

import math

import torch

from .. import backends
from ._common import call, check_same_device, check_same_dtype, check_tensor, define, describe, inner_contiguous

_INDEX = (torch.int32, torch.int64)


def _check_kv(key, value, key_cache, value_cache, slot_mapping):
    check_tensor("key", key, ndim=3)
    check_tensor("value", value, ndim=3)
    check_tensor("key_cache", key_cache, ndim=4)
    check_tensor("value_cache", value_cache, ndim=4)
    check_tensor("slot_mapping", slot_mapping, dtypes=_INDEX, ndim=1)
    check_same_dtype(key_cache=key_cache, value_cache=value_cache, key=key, value=value)
    check_same_device(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    if key.shape != value.shape or key_cache.shape != value_cache.shape:
        raise ValueError(f"key/value ({describe(key)} / {describe(value)}) and key_cache/value_cache "
                         f"({describe(key_cache)} / {describe(value_cache)}) must match pairwise")
    if key.shape[1:] != key_cache.shape[2:]:
        raise ValueError(f"key ({describe(key)}) must be [T, num_kv_heads, head_size] of the cache "
                         f"[num_blocks, block_size, num_kv_heads, head_size] ({describe(key_cache)})")
    if slot_mapping.size(0) != key.size(0):
        raise ValueError(f"slot_mapping ({describe(slot_mapping)}) needs one slot per token ({key.size(0)})")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:  # any block/token/head strides are fine (engine views of a shared buffer)
            raise ValueError(f"{name} must have a contiguous last dim (it is written in place), got strides {t.stride()}")


def _write_impl(key, value, key_cache, value_cache, slot_mapping):
    _check_kv(key, value, key_cache, value_cache, slot_mapping)
    backends.kernel("write_kv_cache", key.device)(inner_contiguous(key), inner_contiguous(value), key_cache,
                                                    value_cache, slot_mapping.long().contiguous())


def _write_fake(key, value, key_cache, value_cache, slot_mapping):
    _check_kv(key, value, key_cache, value_cache, slot_mapping)


define("write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
       "Tensor slot_mapping) -> ()", _write_impl, _write_fake)


def _check_attn(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale):
    check_tensor("q", q, ndim=3)
    check_tensor("key_cache", key_cache, ndim=4)
    check_tensor("value_cache", value_cache, ndim=4)
    check_same_dtype(q=q, key_cache=key_cache, value_cache=value_cache)
    check_tensor("query_start_loc", query_start_loc, dtypes=_INDEX, ndim=1)
    check_tensor("seq_lens", seq_lens, dtypes=_INDEX, ndim=1)
    check_tensor("block_table", block_table, dtypes=_INDEX, ndim=2)
    check_same_device(q=q, key_cache=key_cache, value_cache=value_cache, query_start_loc=query_start_loc,
                      seq_lens=seq_lens, block_table=block_table)
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache ({describe(key_cache)}) and value_cache ({describe(value_cache)}) differ")
    heads_kv, head_size = key_cache.size(2), key_cache.size(3)
    if q.size(2) != head_size or q.size(1) % heads_kv != 0:
        raise ValueError(f"q ({describe(q)}) must be [T, num_heads, {head_size}] with num_heads a multiple "
                         f"of num_kv_heads = {heads_kv} (cache {describe(key_cache)})")
    batch = seq_lens.size(0)
    if query_start_loc.size(0) != batch + 1 or block_table.size(0) != batch:
        raise ValueError(f"query_start_loc ({describe(query_start_loc)}) needs B+1 entries and block_table "
                         f"({describe(block_table)}) B rows for seq_lens ({describe(seq_lens)})")
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")


def _run_attention(kernel, q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale):
    _check_attn(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale)
    fn = backends.kernel(kernel, q.device)
    return fn(inner_contiguous(q), inner_contiguous(key_cache), inner_contiguous(value_cache),
              query_start_loc.to(torch.int32).contiguous(), seq_lens.to(torch.int32).contiguous(),
              block_table.to(torch.int32).contiguous(), scale)


def _attn_impl(*args):
    return _run_attention("attention", *args)


def _attn_fake(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale):
    _check_attn(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


define("attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor query_start_loc, Tensor seq_lens, "
       "Tensor block_table, float scale) -> Tensor", _attn_impl, _attn_fake)


def _lse_impl(*args):
    return _run_attention("attention_with_lse", *args)


def _lse_fake(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale):
    _check_attn(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=torch.float32))


define("attention_with_lse(Tensor q, Tensor key_cache, Tensor value_cache, Tensor query_start_loc, "
       "Tensor seq_lens, Tensor block_table, float scale) -> (Tensor, Tensor)", _lse_impl, _lse_fake)


def _bwd_impl(grad_out, q, key_cache, value_cache, out, lse, query_start_loc, seq_lens, block_table, scale):
    fn = backends.kernel("attention_backward", q.device)
    return fn(grad_out.contiguous(), q.contiguous(), key_cache.contiguous(), value_cache.contiguous(),
              out.contiguous(), lse.contiguous(), query_start_loc.to(torch.int32).contiguous(),
              seq_lens.to(torch.int32).contiguous(), block_table.to(torch.int32).contiguous(), scale)


def _bwd_fake(grad_out, q, key_cache, value_cache, out, lse, query_start_loc, seq_lens, block_table, scale):
    return torch.empty_like(q), torch.empty_like(key_cache), torch.empty_like(value_cache)


define("attention_backward(Tensor grad_out, Tensor q, Tensor key_cache, Tensor value_cache, Tensor out, "
       "Tensor lse, Tensor query_start_loc, Tensor seq_lens, Tensor block_table, float scale) "
       "-> (Tensor, Tensor, Tensor)", _bwd_impl, _bwd_fake)


# Autograd: FlashAttention-2 style recomputation in a deterministic kernel (no atomics; dk/dv
# summed over queries in a fixed order), gradients w.r.t. q and both caches.

def _lse_setup(ctx, inputs, output):
    q, key_cache, value_cache, qsl, seq_lens, block_table, scale = inputs
    ctx.save_for_backward(q, key_cache, value_cache, output[0], output[1], qsl, seq_lens, block_table)
    ctx.scale = scale


def _lse_backward(ctx, grad_out, grad_lse):
    q, kc, vc, out, lse, qsl, seq_lens, table = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 7
    dq, dk, dv = torch.ops.batch_invariant.attention_backward(grad_out, q, kc, vc, out, lse, qsl, seq_lens, table,
                                                              ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("batch_invariant::attention_with_lse", _lse_backward, setup_context=_lse_setup)


def _attn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.scale = inputs[6]


def _attn_backward(ctx, grad_out):
    q, kc, vc, qsl, seq_lens, table = ctx.saved_tensors
    out, lse = torch.ops.batch_invariant.attention_with_lse(q, kc, vc, qsl, seq_lens, table, ctx.scale)
    dq, dk, dv = torch.ops.batch_invariant.attention_backward(grad_out, q, kc, vc, out, lse, qsl, seq_lens, table,
                                                              ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("batch_invariant::attention", _attn_backward, setup_context=_attn_setup)


def write_kv_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Write ``key``/``value`` ``[T, Hk, D]`` into the paged caches at ``slot_mapping`` (in place;
    slots < 0 are skipped, as vLLM pads)."""
    call(torch.ops.batch_invariant.write_kv_cache, key, value, key_cache, value_cache, slot_mapping)


def attention(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale: float | None = None):
    """Causal paged attention for a batch mixing prefill chunks and decodes (vLLM V1 metadata).

    q ``[T, Hq, D]``; caches ``[num_blocks, block_size, Hk, D]``; ``query_start_loc`` ``[B+1]``;
    ``seq_lens`` ``[B]`` (tokens in context, new ones included); ``block_table`` ``[B, max_blocks]``.
    ``scale`` defaults to ``1/sqrt(D)``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.size(-1))
    args = (q, key_cache, value_cache, query_start_loc, seq_lens, block_table, float(scale))
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args[:3]):
        # Same output bits; also keeps the log-sum-exp for the backward pass.
        return call(torch.ops.batch_invariant.attention_with_lse, *args)[0]
    return call(torch.ops.batch_invariant.attention, *args)


def attention_ref(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale=None):
    """float64 masked-softmax reference over the gathered (logical) keys."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    block_size, heads_kv = key_cache.size(1), key_cache.size(2)
    group = q.size(1) // heads_kv
    out = torch.empty_like(q)
    for b in range(seq_lens.size(0)):
        start, end, ctx = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        if end == start:
            continue
        j = torch.arange(ctx)
        blocks = block_table[b].long()[j // block_size]
        k = key_cache[blocks, j % block_size].double().repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = value_cache[blocks, j % block_size].double().repeat_interleave(group, dim=1)
        qb = q[start:end].double()
        pos = ctx - (end - start) + torch.arange(end - start)
        s = torch.einsum("thd,jhd->htj", qb, k) * scale
        s = s.masked_fill(j[None, None, :] > pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("htj,jhd->thd", torch.softmax(s, -1), v).to(q.dtype)
    return out


def _register_cpu():
    ext = backends.cpu_extension()
    backends.register_kernel("cpu", "write_kv_cache", ext.write_kv_cache)
    backends.register_kernel("cpu", "attention", ext.attention)
    backends.register_kernel("cpu", "attention_with_lse", ext.attention_with_lse)
    backends.register_kernel("cpu", "attention_backward", ext.attention_backward)


def _register_cuda():
    # attention / attention_with_lse: csrc/cuda/launch_attention.cu. write_kv_cache and
    # attention_backward on the cuda backend run the Triton kernels (ops/__init__.py's loader).
    ext = backends.cuda_extension()
    backends.register_kernel("cuda", "attention", ext.attention)
    backends.register_kernel("cuda", "attention_with_lse", ext.attention_with_lse)
