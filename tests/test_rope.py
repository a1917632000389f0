"""Rotary embedding and its cos/sin table."""
from __future__ import annotations

import math

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.rope import rotary_embedding_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _qk(tokens, hq, hk, head, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, hq * head, generator=g).to(dtype), torch.randn(tokens, hk * head, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("head,rot", [(64, 64), (128, 128), (80, 40), (72, 72)])
def test_rope_matches_float64(backend, require, dtype, is_neox, head, rot):
    require(backend, "rotary_embedding")
    cache = bi.rope_cos_sin_cache(rot, 4096, 10000.0)
    pos = torch.tensor([0, 1, 5, 4095, 1000, 77])
    q, k = _qk(6, 4, 2, head, dtype, 1)
    qo, ko = bi.rotary_embedding(pos, q, k, head, cache, is_neox)
    qr, kr = rotary_embedding_ref(pos, q, k, head, cache, is_neox)
    ulp = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -23}[dtype]
    for got, ref, x in ((qo, qr, q), (ko, kr, k)):
        # Reason: fp32 rotation (2 products + 1 add, ~2 fp32 ulp of |x|) then one rounding.
        assert T.max_abs_error(got, ref) <= (ulp + 4 * 2 ** -24) * float(x.double().abs().max()) * 2
    # dims after rot_dim pass through unchanged
    if rot < head:
        assert T.bits_equal(qo.view(6, 4, head)[..., rot:], q.view(6, 4, head)[..., rot:])


def test_rope_row_invariance_and_layouts(backend, require):
    require(backend, "rotary_embedding")
    cache = bi.rope_cos_sin_cache(128, 2048)

    def make(m, s):
        q, k = _qk(m, 8, 2, 128, torch.bfloat16, s)
        return torch.cat([q, k], 1)

    def fn(rows):
        pos = torch.arange(rows.size(0)) * 0 + 37
        q, k = rows[:, :1024], rows[:, 1024:]
        qo, ko = bi.rotary_embedding(pos, q, k, 128, cache, True)
        return torch.cat([qo, ko], 1)

    assert not T.row_invariance_mismatches(fn, make, batch_sizes=(1, 2, 17, 128))
    q, k = _qk(5, 8, 2, 128, torch.bfloat16, 3)
    pos = torch.arange(5)
    flat = bi.rotary_embedding(pos, q, k, 128, cache, True)
    three = bi.rotary_embedding(pos, q.view(5, 8, 128), k.view(5, 2, 128), 128, cache, True)
    assert T.bits_equal(flat[0], three[0].view(5, -1)) and T.bits_equal(flat[1], three[1].view(5, -1))


def test_cos_sin_cache_scalings():
    plain = bi.rope_cos_sin_cache(64, 100, 10000.0)
    assert plain.dtype == torch.float32 and plain.shape == (100, 64)
    pos, i = 37, 5
    inv = 1 / 10000.0 ** (2 * i / 64)
    assert plain[pos, i].item() == pytest.approx(math.cos(pos * inv), abs=1e-7)
    assert plain[pos, 32 + i].item() == pytest.approx(math.sin(pos * inv), abs=1e-7)
    linear = bi.rope_cos_sin_cache(64, 100, 10000.0, {"rope_type": "linear", "factor": 2.0})
    assert torch.equal(linear[2 * 10], plain[10])
    llama3 = bi.rope_cos_sin_cache(128, 64, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    base = bi.rope_cos_sin_cache(128, 64, 500000.0)
    assert torch.equal(llama3[:, :8], base[:, :8])  # high-frequency dims are not scaled
    assert not torch.equal(llama3, base)
    yarn = bi.rope_cos_sin_cache(64, 100, 10000.0, {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32})
    assert yarn[0, 0].item() == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-6)  # mscale folded in
    with pytest.raises(ValueError, match="dynamic"):
        bi.rope_cos_sin_cache(64, 100, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


def test_rope_bad_input():
    cache = bi.rope_cos_sin_cache(64, 16)
    q, k = torch.randn(3, 128), torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        bi.rotary_embedding(torch.tensor([0, 1, 16]), q, k, 64, cache)
    with pytest.raises(TypeError, match="dtype"):
        bi.rotary_embedding(torch.tensor([0, 1, 2], dtype=torch.int32), q, k, 64, cache)
    with pytest.raises(ValueError, match="heads"):
        bi.rotary_embedding(torch.tensor([0, 1, 2]), torch.randn(3, 100), k, 64, cache)
    with pytest.raises(ValueError, match="rot_dim"):
        bi.rotary_embedding(torch.tensor([0, 1, 2]), q, k, 32, cache)
    with pytest.raises(TypeError, match="share a dtype"):
        bi.rotary_embedding(torch.tensor([0, 1, 2]), q, k.bfloat16(), 64, cache)
