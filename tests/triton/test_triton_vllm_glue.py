"""The vLLM plugin's CUDA attention glue (vllm_plugin/attention_cuda.py) driven through the Triton
interpreter: vLLM's TRITON_ATTN KV buffer layout, our KV write and attention on its strided views,
and the result equal to bi.attention on plain caches. (No GPU build of vLLM is at hand; this is
the part of the GPU serving path that can run here.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import batch_invariant as bi
from batch_invariant import backends
from batch_invariant import testing as T

pytest.importorskip("vllm", reason="vLLM is not installed")

HQ, HK, D, BS = 4, 2, 16, 16


def _impl(**overrides):
    from batch_invariant.vllm_plugin.attention_cuda import BITritonAttentionImpl

    kwargs = dict(num_heads=HQ, head_size=D, scale=D ** -0.5, num_kv_heads=HK, alibi_slopes=None,
                  sliding_window=None, kv_cache_dtype="auto")
    kwargs.update(overrides)
    return BITritonAttentionImpl(**kwargs)


def test_triton_attn_layout_glue(triton_device):
    for op in ("write_kv_cache", "attention"):
        if not backends.has_kernel("triton", op):
            pytest.skip(f"triton backend has no {op} kernel here")
    dev, dtype = triton_device, torch.bfloat16
    impl = _impl()
    g = torch.Generator().manual_seed(0)
    lens, q_lens = [21, 9], [21, 1]  # a prefill and a decode step in one batch
    blocks = 6
    # vLLM's TRITON_ATTN buffer: [num_blocks, num_kv_heads, block_size, 2*head_size] (logical order).
    kv_buffer = torch.zeros(blocks, HK, BS, 2 * D, dtype=dtype, device=dev)
    table = torch.tensor([[4, 1], [2, 0]], dtype=torch.int32, device=dev)
    tokens = sum(q_lens)
    key = torch.randn(tokens, HK, D, generator=g).to(dtype).to(dev)
    value = torch.randn(tokens, HK, D, generator=g).to(dtype).to(dev)
    query = torch.randn(tokens, HQ, D, generator=g).to(dtype).to(dev)
    # Decode sequence: its first 8 tokens already in the cache (written by an earlier step).
    past_k = torch.randn(8, HK, D, generator=g).to(dtype).to(dev)
    past_v = torch.randn(8, HK, D, generator=g).to(dtype).to(dev)
    kc, vc = kv_buffer.transpose(1, 2).split(D, dim=-1)
    past_slots = table[1, 0].long() * BS + torch.arange(8, device=dev)
    bi.write_kv_cache(past_k, past_v, kc, vc, past_slots)
    slot_of = lambda b, j: int(table[b, j // BS]) * BS + j % BS  # noqa: E731
    slots = torch.tensor([slot_of(0, j) for j in range(21)] + [slot_of(1, 8)], device=dev)
    meta = SimpleNamespace(num_actual_tokens=tokens, causal=True,
                           query_start_loc=torch.tensor([0, 21, 22], dtype=torch.int32, device=dev),
                           seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_table=table)
    impl.do_kv_cache_update(None, key, value, kv_buffer, slots)
    output = torch.empty(tokens + 3, HQ * D, dtype=dtype, device=dev)  # padded like vLLM's buffers
    impl.forward(None, query, key, value, kv_buffer, meta, output)

    # The same computation on plain [NB, BS, Hk, D] caches.
    kc2 = torch.zeros(blocks, BS, HK, D, dtype=dtype, device=dev)
    vc2 = torch.zeros_like(kc2)
    bi.write_kv_cache(past_k, past_v, kc2, vc2, past_slots)
    bi.write_kv_cache(key, value, kc2, vc2, slots)
    assert T.bits_equal(kc.contiguous(), kc2) and T.bits_equal(vc.contiguous(), vc2)
    expect = bi.attention(query, kc2, vc2, meta.query_start_loc, meta.seq_lens, table)
    assert T.bits_equal(output[:tokens].view(tokens, HQ, D), expect)


def test_unsupported_attention_features_fail_closed():
    from batch_invariant.vllm_plugin.layers import BatchInvariantUnsupported

    for overrides, name in (({"sliding_window": 8}, "sliding window"), ({"logits_soft_cap": 30.0}, "soft-cap"),
                            ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype")):
        with pytest.raises(BatchInvariantUnsupported, match=name):
            _impl(**overrides)


def test_cuda_compat_symbols_present():
    """The vLLM internals the CUDA wiring relies on have the expected signatures in this vLLM (the
    CUDA platform module itself only imports in a CUDA build of vLLM)."""
    from batch_invariant.vllm_plugin import compat_v0_32

    compat_v0_32.check_symbols([r for r in compat_v0_32._REQUIRED_CUDA if r[0] != "vllm.platforms.cuda"])
