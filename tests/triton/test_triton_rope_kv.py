"""Triton rotary_embedding and write_kv_cache through the public API.

rope: exact (bitwise) agreement with the contract's fp32 formula emulated in torch and with the
CPU backend, the float64 reference within a rounding bound, NeoX and GPT-J layouts, partial
rot_dim, [T, H*D] and [T, H, D] inputs, row invariance, determinism, and a negative control (an
fma-contracted formula gives other bits). write_kv_cache: a pure bit copy into caches that are
strided views of shared buffers, padding slots skipped, out-of-range slots rejected, the same cache
whatever the batching, and the same bits as the CPU backend. Interpreter-sized on CPU; realistic
sizes on CUDA (BATCH_INVARIANT_TEST_DEVICE=cuda).
"""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.rope import rotary_embedding_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
U32 = 2.0 ** -24  # fp32 unit roundoff


def _rope_sizes(device):
    """(tokens, q heads, k heads, head size, max position, invariance batch sizes)."""
    if device.type == "cpu":
        return 7, 4, 2, 64, 256, (2, 5, 16)
    return 256, 32, 8, 128, 4096, T.BATCH_SIZES


def _rand(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _positions(tokens, max_pos, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_pos, (tokens,), generator=g).to(device)


def _with_cpu_backend(fn, *args):
    bi.set_backend("cpu")
    try:
        return fn(*args)
    finally:
        bi.set_backend("triton")


# ------------------------------------------------------------------------------------------
# rotary_embedding

def _rope_formula(positions, x, head_size, cache, is_neox, fused=False):
    """The contract on the host: x1' = x1*c - x2*s, x2' = x2*c + x1*s with IEEE fp32 products (the
    float64 product of two fp32 values is exact, rounded once to fp32) and an fp32 subtraction /
    addition, then one rounding to x's dtype; the tail past rot_dim unchanged.
    fused=True: the fma-contracted variant, x1*c - round(x2*s) rounded once (negative control)."""
    x, cache, positions = x.cpu(), cache.cpu(), positions.cpu()
    heads = x.reshape(x.size(0), -1, head_size).float()
    rot, half = cache.size(1), cache.size(1) // 2
    cos, sin = cache[positions, :half][:, None, :], cache[positions, half:][:, None, :]
    if is_neox:
        i1, i2 = torch.arange(half), torch.arange(half, rot)
    else:
        i1, i2 = torch.arange(0, rot, 2), torch.arange(1, rot, 2)
    x1, x2 = heads[..., i1], heads[..., i2]

    def mul(a, b):
        return (a.double() * b.double()).float()

    if fused:
        o1 = (x1.double() * cos.double() - mul(x2, sin).double()).float()
        o2 = (x2.double() * cos.double() + mul(x1, sin).double()).float()
    else:
        o1, o2 = mul(x1, cos) - mul(x2, sin), mul(x2, cos) + mul(x1, sin)
    out = heads.clone()
    out[..., i1], out[..., i2] = o1, o2
    return out.to(x.dtype).reshape(x.shape)


def _rope_inputs(device, dtype, three_d, seed=0, tokens=None):
    t, hq, hk, d, max_pos, _ = _rope_sizes(device)
    t = tokens or t
    q = _rand((t, hq, d) if three_d else (t, hq * d), dtype, device, seed, scale=2.0)
    k = _rand((t, hk, d) if three_d else (t, hk * d), dtype, device, seed + 1, scale=2.0)
    return _positions(t, max_pos, device, seed + 2), q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", (True, False), ids=("neox", "gptj"))
@pytest.mark.parametrize("rot_fraction", (1, 2), ids=("full", "partial"))
@pytest.mark.parametrize("three_d", (False, True), ids=("2d", "3d"))
def test_rope_exact_formula_and_float64(triton_device, dtype, is_neox, rot_fraction, three_d):
    _, _, _, head, max_pos, _ = _rope_sizes(triton_device)
    cache = bi.rope_cos_sin_cache(head // rot_fraction, max_pos, base=10000.0).to(triton_device)
    pos, q, k = _rope_inputs(triton_device, dtype, three_d)
    q_out, k_out = bi.rotary_embedding(pos, q, k, head, cache, is_neox)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.dtype == dtype
    for x, got in ((q, q_out), (k, k_out)):
        # Bitwise: the fp32 formula without fma and with one rounding is exactly specified.
        assert T.bits_equal(got.cpu(), _rope_formula(pos, x, head, cache, is_neox))
        # float64 reference: two fp32 products and one add/sub, each <= u relative, on terms
        # bounded by max|x| (|cos|, |sin| <= 1), then one rounding to the dtype.
        exact, _ = rotary_embedding_ref(pos.cpu(), x.double().cpu(), x.double().cpu(), head, cache.cpu(), is_neox)
        u_out = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: U32}[dtype]
        tol = exact.abs() * u_out * 1.01 + 4 * U32 * float(x.abs().max())
        assert bool(((got.double().cpu() - exact).abs() <= tol).all())
    again = bi.rotary_embedding(pos, q, k, head, cache, is_neox)
    assert T.bits_equal(again[0], q_out) and T.bits_equal(again[1], k_out)  # run to run


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_bits_match_cpu_backend(triton_device, require, dtype):
    """No reduction and no transcendental: the Triton and CPU backends give the same bits."""
    require("cpu", "rotary_embedding")
    _, _, _, head, max_pos, _ = _rope_sizes(triton_device)
    for is_neox, rot in ((True, head), (False, head), (True, head // 2)):
        cache = bi.rope_cos_sin_cache(rot, max_pos).to(triton_device)
        pos, q, k = _rope_inputs(triton_device, dtype, three_d=False, seed=rot)
        got = bi.rotary_embedding(pos, q, k, head, cache, is_neox)
        ref = _with_cpu_backend(bi.rotary_embedding, pos.cpu(), q.cpu(), k.cpu(), head, cache.cpu(), is_neox)
        assert T.bits_equal(got[0].cpu(), ref[0]) and T.bits_equal(got[1].cpu(), ref[1])


def test_rope_layouts_agree_and_rows_are_invariant(triton_device):
    tokens, hq, hk, head, max_pos, batch_sizes = _rope_sizes(triton_device)
    dtype = torch.bfloat16
    cache = bi.rope_cos_sin_cache(head, max_pos).to(triton_device)
    pos, q, k = _rope_inputs(triton_device, dtype, three_d=True)
    q3, k3 = bi.rotary_embedding(pos, q, k, head, cache, True)
    q2, k2 = bi.rotary_embedding(pos, q.flatten(1), k.flatten(1), head, cache, True)
    assert T.bits_equal(q3.flatten(1), q2) and T.bits_equal(k3.flatten(1), k2)

    # A row = [position | q | k] (float64 holds all of them exactly).
    def make(m, seed):
        p, qq, kk = _rope_inputs(triton_device, dtype, three_d=False, seed=seed, tokens=m)
        return torch.cat([p[:, None].double(), qq.double(), kk.double()], dim=1)

    def fn(rows):
        p = rows[:, 0].long()
        qq, kk = rows[:, 1:1 + hq * head].to(dtype), rows[:, 1 + hq * head:].to(dtype)
        qo, ko = bi.rotary_embedding(p, qq, kk, head, cache, True)
        return torch.cat([qo.double(), ko.double()], dim=1)

    assert not T.row_invariance_mismatches(fn, make, batch_sizes=batch_sizes)


def test_negative_control_fma_contraction_changes_rope_bits(triton_device):
    """The exact comparison above would catch a compiler contracting x1*c - x2*s into an fma."""
    _, _, _, head, max_pos, _ = _rope_sizes(triton_device)
    cache = bi.rope_cos_sin_cache(head, max_pos).to(triton_device)
    pos, q, k = _rope_inputs(triton_device, torch.float32, three_d=False, seed=11)
    q_out, _ = bi.rotary_embedding(pos, q, k, head, cache, True)
    assert T.bits_equal(q_out.cpu(), _rope_formula(pos, q, head, cache, True))
    assert not T.bits_equal(q_out.cpu(), _rope_formula(pos, q, head, cache, True, fused=True))


# ------------------------------------------------------------------------------------------
# write_kv_cache

def _kv_sizes(device):
    """(tokens, num_blocks, block_size, kv heads, q heads, head size)."""
    if device.type == "cpu":
        return 9, 6, 4, 2, 4, 64
    return 512, 256, 16, 8, 32, 128


def _random_bits(shape, dtype, device, seed):
    """Arbitrary bit patterns (NaN payloads, infinities, subnormals included)."""
    width = {2: torch.int16, 4: torch.int32}[torch.empty(0, dtype=dtype).element_size()]
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(width)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(width).view(dtype).to(device)


def _caches(layout, dtype, device, seed):
    _, nb, bs, hk, _, d = _kv_sizes(device)
    if layout == "separate":
        shape = (nb, bs, hk, d)
        return _random_bits(shape, dtype, device, seed), _random_bits(shape, dtype, device, seed + 1)
    if layout == "interleaved":  # one buffer [NB, 2, BS, Hk, D]: K and V blocks side by side
        buf = _random_bits((nb, 2, bs, hk, d), dtype, device, seed)
        return buf[:, 0], buf[:, 1]
    buf = _random_bits((2, nb, hk, bs, d), dtype, device, seed)  # head-major pages, seen as [NB, BS, Hk, D]
    return buf[0].permute(0, 2, 1, 3), buf[1].permute(0, 2, 1, 3)


def _kv_tokens(dtype, device, seed):
    """key/value [T, Hk, D] as slices of a fused qkv projection (row stride != Hk*D), and slots:
    distinct, in shuffled blocks, with padding (-1) slots."""
    t, nb, bs, hk, hq, d = _kv_sizes(device)
    qkv = _random_bits((t, hq + 2 * hk, d), dtype, device, seed)
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[1::4] = -1
    return qkv[:, hq:hq + hk], qkv[:, hq + hk:], slots.to(device)


def _expected(key, value, kc, vc, slots):
    ek, ev = kc.cpu().clone(), vc.cpu().clone()
    bs = kc.size(1)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            ek[s // bs, s % bs] = key[t].cpu()
            ev[s // bs, s % bs] = value[t].cpu()
    return ek, ev


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("separate", "interleaved", "head_major"))
def test_write_kv_cache_copies_bits(triton_device, dtype, layout):
    kc, vc = _caches(layout, dtype, triton_device, seed=1)
    key, value, slots = _kv_tokens(dtype, triton_device, seed=2)
    assert key.stride(0) != key.size(1) * key.size(2)
    ek, ev = _expected(key, value, kc, vc, slots)
    bi.write_kv_cache(key, value, kc, vc, slots)
    assert T.bits_equal(kc.cpu(), ek) and T.bits_equal(vc.cpu(), ev)
    # int32 slot mappings are accepted too; writing the same tokens again changes nothing.
    bi.write_kv_cache(key, value, kc, vc, slots.to(torch.int32))
    assert T.bits_equal(kc.cpu(), ek) and T.bits_equal(vc.cpu(), ev)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_write_kv_cache_matches_cpu_backend(triton_device, require, dtype):
    require("cpu", "write_kv_cache")
    kc, vc = _caches("interleaved", dtype, triton_device, seed=3)
    key, value, slots = _kv_tokens(dtype, triton_device, seed=4)
    kc_cpu, vc_cpu = kc.cpu().clone(), vc.cpu().clone()
    bi.write_kv_cache(key, value, kc, vc, slots)
    _with_cpu_backend(bi.write_kv_cache, key.cpu(), value.cpu(), kc_cpu, vc_cpu, slots.cpu())
    assert T.bits_equal(kc.cpu(), kc_cpu) and T.bits_equal(vc.cpu(), vc_cpu)


def test_write_kv_cache_is_batch_invariant(triton_device):
    """All tokens in one call, one token per call (decode), or reversed chunks: the same cache."""
    dtype = torch.bfloat16
    key, value, slots = _kv_tokens(dtype, triton_device, seed=5)
    tokens = key.size(0)
    results = []
    for schedule in ([range(tokens)], [[t] for t in range(tokens)],
                     [range(t, min(t + 3, tokens)) for t in reversed(range(0, tokens, 3))]):
        kc, vc = _caches("interleaved", dtype, triton_device, seed=6)
        for part in schedule:
            idx = torch.tensor(list(part), device=triton_device)
            bi.write_kv_cache(key[idx], value[idx], kc, vc, slots[idx])
        results.append((kc.cpu(), vc.cpu()))
    for kc, vc in results[1:]:
        assert T.bits_equal(kc, results[0][0]) and T.bits_equal(vc, results[0][1])


def test_write_kv_cache_rejects_out_of_range_slots(triton_device):
    kc, vc = _caches("separate", torch.float16, triton_device, seed=7)
    key, value, slots = _kv_tokens(torch.float16, triton_device, seed=8)
    before = (kc.cpu().clone(), vc.cpu().clone())
    bad = slots.clone()
    bad[-1] = kc.size(0) * kc.size(1)  # one past the last slot
    with pytest.raises(ValueError, match="out of range"):
        bi.write_kv_cache(key, value, kc, vc, bad)
    assert T.bits_equal(kc.cpu(), before[0]) and T.bits_equal(vc.cpu(), before[1])  # nothing written
    only_padding = torch.full_like(slots, -1)
    bi.write_kv_cache(key, value, kc, vc, only_padding)
    assert T.bits_equal(kc.cpu(), before[0]) and T.bits_equal(vc.cpu(), before[1])
