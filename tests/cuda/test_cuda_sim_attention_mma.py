"""CUDA tensor-core paged attention forward (csrc/cuda/kernels/attention_mma.cuh: bf16 / fp16, head
size 64 / 128) run on the CPU SIMT simulator through the launcher's plan (attention_plan.cuh):
which kernels run (a function of dtype and head size only), correctness vs the float64
attention_ref measured against torch's own SDPA error in the same dtype (P is rounded to the
dtype before the P V product, as in FlashAttention / torch), bitwise invariance (prefill ==
chunked prefill == decode, alone == in company, page sizes 16 / 32 with shuffled block tables,
GQA groups 1, 2, 3, 4, 8 and 80 (two head chunks)), 3 splits (contexts up to 1100), the
split-parallel path bitwise equal to the sequential one, padding tokens, the cp.async and the
element-load staging giving the same bits, determinism under both fiber schedules, and a negative
control (a split size chosen by the launch's token count is caught).

The simulator's mma is a fixed-order binary64 routine (csrc/cuda/sim/sim_mma.h), not the tensor
core's internal rounding: these tests check the kernels' logic and their invariance structure; the
device tests (test_cuda_device.py) check the device bits."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from batch_invariant import contract
from batch_invariant import testing as T
from batch_invariant.ops.attention import attention_ref

DTYPES = (torch.bfloat16, torch.float16)
U32 = 2.0 ** -24


_problem = T.paged_attention_problem


def _gather(kc, vc, bt_row, c, group):
    bs = kc.size(1)
    j = torch.arange(c)
    blk = bt_row.long()[j // bs]
    return kc[blk, j % bs].repeat_interleave(group, 1), vc[blk, j % bs].repeat_interleave(group, 1)


def _sdpa(q, kc, vc, qsl, lens, bt, scale):
    """torch's scaled_dot_product_attention in q's dtype (CPU), per sequence with a causal mask."""
    out = torch.zeros_like(q)
    group = q.size(1) // kc.size(2)
    for b in range(lens.numel()):
        s0, s1, c = int(qsl[b]), int(qsl[b + 1]), int(lens[b])
        k, v = _gather(kc, vc, bt[b], c, group)
        pos = c - (s1 - s0) + torch.arange(s1 - s0)
        mask = torch.arange(c)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(q[s0:s1].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[s0:s1] = o.transpose(0, 1)
    return out


def _lse64(q, kc, vc, qsl, lens, bt, scale):
    """float64 logsumexp of every (token, head) and sum_d |q_d k_d| * scale (max over keys)."""
    lse = torch.zeros(q.size(0), q.size(1), dtype=torch.float64)
    mag = torch.zeros_like(lse)
    group = q.size(1) // kc.size(2)
    for b in range(lens.numel()):
        s0, s1, c = int(qsl[b]), int(qsl[b + 1]), int(lens[b])
        k, _ = _gather(kc.double(), vc.double(), bt[b], c, group)
        for i, t in enumerate(range(s0, s1)):
            p = c - (s1 - s0) + i
            qq = q[t].double()
            lse[t] = torch.logsumexp(torch.einsum("hd,jhd->hj", qq, k[:p + 1]) * scale, dim=1)
            mag[t] = (torch.einsum("hd,jhd->hj", qq.abs(), k[:p + 1].abs()) * scale).amax(dim=1)
    return lse, mag


def _check_accuracy(out, lse, args, scale):
    """out: max |out - ref| <= 2 x torch SDPA's max error on the same inputs (same dtype) + u * max|ref|.
    Both round P (or an equivalent) to the dtype before P V and round the output once; the factor 2
    leaves room for a different summation order and the exp polynomial, the floor (half an ulp of
    the largest output: one output rounding) for inputs where torch happens to land exactly.
    lse: fp32 all along (scores from exact bf16 / fp16 products in fp32 accumulators, l from the
    unrounded p_j): |lse - ref| <= 4 (D/16 + 2) u32 max_j sum_d |q_d k_dj| scale (the k16 MMA steps
    and the scale multiply, x4 for the tensor core's truncating alignment) + (n + 16) u32 (1 + |lse|)
    (exp_f32 ~2 ulp per key, the n-term sums, log_f32, the final add)."""
    q = args[0]
    dtype, D = q.dtype, q.size(2)
    ref = attention_ref(*(a.double() if a.is_floating_point() else a for a in args), scale)
    err = float((out.double() - ref).abs().max())
    sdpa_err = float((_sdpa(*args, scale).double() - ref).abs().max())
    u = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    bound = 2 * sdpa_err + u * float(ref.abs().max())
    assert err <= bound, f"out error {err:.3g} > {bound:.3g} (torch sdpa: {sdpa_err:.3g})"
    if lse is not None:
        lref, mag = _lse64(*args, scale)
        n = int(args[4].max())
        ltol = 4 * (D / 16 + 2) * U32 * mag + (n + 16) * U32 * (1 + lref.abs())
        qsl = args[3]
        rows = slice(int(qsl[0]), int(qsl[-1]))
        lerr = (lse.double() - lref)[rows].abs()
        assert bool((lerr <= ltol[rows]).all()), f"lse error {float((lerr - ltol[rows]).max()):.3g} over the bound"


def _bits(x):
    if isinstance(x, (list, tuple)):
        return torch.cat([o.reshape(-1) for o in x]).view(torch.uint8)
    return x.reshape(-1).view(torch.uint8)


# ------------------------------------------------------------------------------------------
# Which kernels run: a function of (dtype, head size) only.

def test_kernel_choice(sim):
    for dtype in DTYPES:
        for D in (64, 128):
            assert sim.attention_kernel(dtype, D) == "mma"
        for D in (32, 48, 80, 256):
            assert sim.attention_kernel(dtype, D) == "simt"
    assert sim.attention_kernel(torch.float32, 128) == "simt"  # fp32: IEEE SIMT, never TF32


# ------------------------------------------------------------------------------------------
# Correctness

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", (64, 128))
def test_matches_float64_reference_like_torch_sdpa(sim, dtype, D):
    # a 3-split decode-like chunk (1100 keys), a chunked prefill, a short prefill; GQA group 4
    args = _problem(dtype, D=D, hq=8, hk=2, ctx=(1100, 70, 5), qlens=(3, 20, 5), seed=D)
    scale = 1.0 / math.sqrt(D)
    out, lse = sim.attention(*args, scale, with_lse=True)
    assert out.dtype == dtype and out.shape == args[0].shape
    _check_accuracy(out, lse, args, scale)
    assert torch.equal(_bits(sim.attention(*args, scale)), _bits(out))  # without lse: the same bits


@pytest.mark.parametrize("group,hk", ((3, 1), (80, 1)))
def test_odd_and_large_gqa_groups(sim, group, hk):
    # group 3: 21 tokens x 3 heads per tile (row 63 empty); group 80: two head chunks (64 + 16)
    args = _problem(torch.bfloat16, D=64, hq=group * hk, hk=hk, ctx=(45, 30), qlens=(25, 2), seed=group)
    out, lse = sim.attention(*args, 0.125, with_lse=True)
    _check_accuracy(out, lse, args, 0.125)
    # the second sequence alone: the same bits
    q, kc, vc, qsl, lens, bt = args
    alone = sim.attention(q[25:27], kc, vc, torch.tensor([0, 2], dtype=torch.int32), lens[1:], bt[1:], 0.125)
    assert torch.equal(_bits(alone), _bits(out[25:27]))


def test_padding_tokens_both_paths(sim):
    args = _problem(torch.float16, D=64, hq=4, hk=2, ctx=(600, 12), qlens=(2, 3), pad_front=2, pad_back=3, seed=5)
    for path in ("sequential", "split"):
        out, lse = sim.attention(*args, 0.2, with_lse=True, path=path)
        assert sim.last_attention_path() == path
        for t in (0, 1, 7, 8, 9):
            assert bool((out[t] == 0).all()) and bool((lse[t] == 0).all()), f"{path}: padding token {t}"
        _check_accuracy(out, lse, args, 0.2)


# ------------------------------------------------------------------------------------------
# Invariance (bitwise)

def _seqs(dtype, lengths, hq, hk, D, seed):
    g = torch.Generator().manual_seed(seed)
    qs = [(torch.randn(n, hq, D, generator=g) * 1.5).to(dtype) for n in lengths]
    ks = [(torch.randn(n, hk, D, generator=g) * 1.5).to(dtype) for n in lengths]
    vs = [torch.randn(n, hk, D, generator=g).to(dtype) for n in lengths]
    return qs, ks, vs


def _write(key, value, key_cache, value_cache, slots):
    key_cache.view(-1, *key_cache.shape[2:])[slots] = key
    value_cache.view(-1, *value_cache.shape[2:])[slots] = value


def _attn_fn(sim, split_of=None, path="auto"):
    def fn(q, kc, vc, qsl, lens, bt, scale):
        scale = 1.0 / math.sqrt(q.size(2)) if scale is None else scale
        split = None if split_of is None else split_of(q.size(0))
        return sim.attention(q, kc, vc, qsl, lens, bt, scale, split=split, path=path)
    return fn


LENGTHS = (70, 37, 9)  # 116 tokens: several query tiles, tile boundaries inside sequences


@pytest.mark.parametrize("group,hk,D,dtype", ((1, 2, 64, torch.bfloat16), (2, 2, 128, torch.float16),
                                              (4, 2, 64, torch.float16), (8, 1, 128, torch.bfloat16)))
def test_prefill_chunked_decode_pages_company_bitwise(sim, group, hk, D, dtype):
    qs, ks, vs = _seqs(dtype, LENGTHS, group * hk, hk, D, seed=group)
    base = T.attention_schedule(_attn_fn(sim), _write, qs, ks, vs, T.prefill_schedule(LENGTHS), block_size=16)
    assert not any(bool(torch.isnan(o).any()) for o in base)
    fails = T.schedule_mismatches(_attn_fn(sim), _write, qs, ks, vs, LENGTHS, chunk=7, prompt=50, block_sizes=(16, 32))
    assert not fails, fails


def test_three_splits_prefill_equals_chunked_and_decode(sim):
    """1100 keys (3 splits of 512, the last partial): a whole prefill, a chunked prefill crossing
    both split boundaries and decode steps past 1090 give the same bits for every token."""
    lengths = (1100,)
    qs, ks, vs = _seqs(torch.bfloat16, lengths, 4, 1, 64, seed=77)
    fn = _attn_fn(sim)
    whole = T.attention_schedule(fn, _write, qs, ks, vs, T.prefill_schedule(lengths), block_size=16)[0]
    steps = [[(0, 500)], [(0, 530)], [(0, 60)]] + [[(0, 1)]] * 10  # 500, 1030, 1090, then decode
    mixed = T.attention_schedule(fn, _write, qs, ks, vs, steps, block_size=32, shuffle_seed=5)[0]
    assert torch.equal(_bits(mixed), _bits(whole))


# ------------------------------------------------------------------------------------------
# Split-parallel path (one block per (query tile, kv head, split) + the combine kernel): the same
# bits as the in-block fold.

@pytest.mark.parametrize("dtype,D", ((torch.bfloat16, 128), (torch.float16, 64)))
def test_split_path_equals_sequential_bitwise(sim, dtype, D):
    cases = (
        dict(ctx=(1100,), qlens=(1,)),                    # decode, 3 splits
        dict(ctx=(1100, 515, 40, 1), qlens=(2, 5, 3, 1)),  # chunks crossing split boundaries, a 1-key sequence
    )
    for i, kw in enumerate(cases):
        args = _problem(dtype, D=D, hq=8, hk=2, seed=40 + i, **kw)
        got = {}
        for path in ("sequential", "split"):
            got[path] = sim.attention(*args, 0.1, with_lse=True, path=path)
            assert sim.last_attention_path() == path
        (o1, l1), (o2, l2) = got["sequential"], got["split"]
        assert torch.equal(_bits(o1), _bits(o2)), "out bits differ between the paths"
        assert torch.equal(l1.view(torch.int32), l2.view(torch.int32)), "lse bits differ between the paths"
    # the auto choice for a one-token decode with several splits is the split-parallel path
    sim.attention(*_problem(dtype, D=D, hq=8, hk=2, ctx=(1100,), qlens=(1,), seed=40), 0.1)
    assert sim.last_attention_path() == "split"


def test_element_loads_equal_cp_async(sim):
    """Strided caches (rows not 16-byte aligned: element loads) give the cp.async path's bits."""
    args = _problem(torch.bfloat16, D=64, hq=4, hk=2, ctx=(70, 33), qlens=(9, 33), seed=9)
    q, kc, vc, qsl, lens, bt = args
    out = sim.attention(*args, 0.15)
    nb, bs, hk, d = kc.shape
    big_k = torch.zeros(nb, bs, 2 * hk, d + 1, dtype=kc.dtype)  # odd row pitch: never 16-byte aligned
    big_v = torch.zeros(nb, bs, 2 * hk, d + 1, dtype=kc.dtype)
    big_k[:, :, 1::2, :d] = kc
    big_v[:, :, 1::2, :d] = vc
    out2 = sim.attention(q, big_k[:, :, 1::2, :d], big_v[:, :, 1::2, :d], qsl, lens, bt, 0.15)
    assert torch.equal(_bits(out2), _bits(out))


def test_deterministic_under_both_schedules(sim):
    args = _problem(torch.bfloat16, D=64, hq=4, hk=2, ctx=(600, 33), qlens=(3, 20), seed=21)
    for path in ("sequential", "split"):
        a = sim.attention(*args, 0.2, with_lse=True, path=path)
        with sim.reverse_schedule():
            b = sim.attention(*args, 0.2, with_lse=True, path=path)
        assert torch.equal(_bits(a[0]), _bits(b[0])) and torch.equal(a[1].view(torch.int32), b[1].view(torch.int32))


def test_negative_control_split_by_token_count(sim):
    """A variant whose split size depends on the launch's token count (32 keys for decode-sized
    launches, 512 otherwise) is caught by the prefill == decode comparison of the mma path."""
    lengths = (70, 37)
    qs, ks, vs = _seqs(torch.bfloat16, lengths, 4, 2, 64, seed=13)
    good = _attn_fn(sim)
    bad = _attn_fn(sim, split_of=lambda ntok: 32 if ntok <= len(lengths) else contract.ATTN_SPLIT)
    pre = T.attention_schedule(good, _write, qs, ks, vs, T.prefill_schedule(lengths), block_size=16)
    dec_good = T.attention_schedule(good, _write, qs, ks, vs, T.decode_schedule(lengths, 30), block_size=16)
    dec_bad = T.attention_schedule(bad, _write, qs, ks, vs, T.decode_schedule(lengths, 30), block_size=16)
    assert torch.equal(_bits(dec_good), _bits(pre))
    assert not torch.equal(_bits(dec_bad), _bits(pre))
