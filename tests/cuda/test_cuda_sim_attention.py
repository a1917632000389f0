"""CUDA paged attention forward (csrc/cuda/kernels/attention.cuh) run on the CPU SIMT simulator
(batch_invariant.cuda_sim.attention, the same grid / block / NPL choice as the device launcher):
correctness vs the float64 attention_ref and a float64 logsumexp with stated bounds (bf16 / fp16 /
fp32, page sizes 1 and 16, shuffled block tables, a masked head size, strided caches), a decode
query past the 512-key split, bitwise invariance (prefill == chunked == decode, alone == in
company, page size, with / without lse), determinism under both fiber schedules, padding tokens,
a negative control (a split size chosen by the token count is caught), the split-parallel path
(one warp per split + combine kernel) bitwise equal to the sequential one, and an nvcc compile check
of the SIMT and the tensor-core kernels for sm_80 and sm_90a (PTX: no approximate / ftz /
contractible fp32 operations; no spills). The head sizes here (32, 48) run the SIMT kernels for
every dtype; bf16 / fp16 at D = 64 / 128 (the tensor-core kernels) are tested in
test_cuda_sim_attention_mma.py."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from batch_invariant import contract, nvcc_check
from batch_invariant import cuda_sim
from batch_invariant import testing as T
from batch_invariant.ops.attention import attention_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
U32 = 2.0 ** -24
HQ, HK = 4, 2


_unit_roundoff = cuda_sim.UNIT_ROUNDOFF.__getitem__


def _problem(dtype, *, D=32, block_size=16, ctx=(23, 40, 9), qlens=(23, 5, 1), pad_front=0, pad_back=0,
             seed=0):
    return T.paged_attention_problem(dtype, D=D, hq=HQ, hk=HK, ctx=ctx, qlens=qlens, block_size=block_size,
                                     pad_front=pad_front, pad_back=pad_back, seed=seed)


def _scores64(q, kc, vc, qsl, lens, bt, scale):
    """Per (token, head): float64 scores of keys 0..p, the gathered values, and sum_d |q||k|."""
    bs, group = kc.size(1), q.size(1) // kc.size(2)
    rows = []
    for b in range(lens.size(0)):
        s0, s1, c = int(qsl[b]), int(qsl[b + 1]), int(lens[b])
        j = torch.arange(c)
        blk = bt[b].long()[j // bs]
        k = kc[blk, j % bs].double().repeat_interleave(group, dim=1)
        v = vc[blk, j % bs].double().repeat_interleave(group, dim=1)
        for i, t in enumerate(range(s0, s1)):
            p = c - (s1 - s0) + i
            qq = q[t].double()
            s = torch.einsum("hd,jhd->hj", qq, k[:p + 1]) * scale
            mag = torch.einsum("hd,jhd->hj", qq.abs(), k[:p + 1].abs()) * scale
            rows.append((t, s, mag, v[:p + 1]))
    return rows


def _check_out_lse(out, lse, q, kc, vc, qsl, lens, bt, scale):
    """Bounds (fp32 arithmetic, then one rounding of out to the dtype):
    * a score s_j carries |ds| <= (ceil(D/32) + 5 + 1) u32 * scale * sum_d |q_d k_dj| (D/32 fma per
      lane, the 5-level butterfly, the scale multiply) plus the rounding of the fp32 inputs' exact
      products (none: q, k are exact in fp32);
    * the weights p_j / l then have relative error <= 2 max|ds| + e with e = (n + 16) u32 covering
      exp_f32 (~2 ulp each), the l and acc sums over n keys and the split combine;
    * |out - ref| <= u_dtype |ref| (1 + r) + r max_j |v_j| with r = 2 max|ds| + e;
    * |lse - ref| <= max|ds| + e (1 + |lse|)  (log_f32 ~1 ulp, the final add)."""
    D = q.size(2)
    u = _unit_roundoff(q.dtype)
    # float64 inputs (exact copies): attention_ref then returns float64, not rounded to q's dtype
    ref = attention_ref(q.double(), kc.double(), vc.double(), qsl, lens, bt, scale)
    for t, s, mag, v in _scores64(q, kc, vc, qsl, lens, bt, scale):
        n = s.size(1)
        ds = (math.ceil(D / 32) + 6) * U32 * mag.max(dim=1).values + U32 * s.abs().max(dim=1).values
        e = (n + 16) * U32
        r = (2 * ds + e)[:, None]
        vmax = v.abs().amax(dim=(0, 2))[:, None]
        tol = u * ref[t].abs() * (1 + r) + r * vmax + torch.finfo(q.dtype).tiny
        err = (out[t].double() - ref[t]).abs()
        assert bool((err <= tol).all()), f"token {t}: out error {float((err - tol).max()):.3g} over the bound"
        if lse is not None:
            lref = torch.logsumexp(s, dim=1)
            ltol = ds + e * (1 + lref.abs())
            lerr = (lse[t].double() - lref).abs()
            assert bool((lerr <= ltol).all()), f"token {t}: lse error {float((lerr - ltol).max()):.3g} over the bound"


# ------------------------------------------------------------------------------------------
# Correctness

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", (1, 16))
def test_matches_float64_reference(sim, dtype, block_size):
    q, kc, vc, qsl, lens, bt = _problem(dtype, block_size=block_size, seed=block_size)
    scale = 1.0 / math.sqrt(q.size(2))
    out, lse = sim.attention(q, kc, vc, qsl, lens, bt, scale, with_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    _check_out_lse(out, lse, q, kc, vc, qsl, lens, bt, scale)
    # attention (no lse) gives the same bits
    assert torch.equal(sim.attention(q, kc, vc, qsl, lens, bt, scale).view(torch.uint8), out.view(torch.uint8))


def test_masked_head_size_and_strided_cache(sim):
    # D = 48: the second register of each lane is masked for lanes 16..31 (NPL 2)
    q, kc, vc, qsl, lens, bt = _problem(torch.bfloat16, D=48, ctx=(30, 7), qlens=(4, 7), seed=3)
    scale = 0.17
    out, lse = sim.attention(q, kc, vc, qsl, lens, bt, scale, with_lse=True)
    _check_out_lse(out, lse, q, kc, vc, qsl, lens, bt, scale)
    # the same caches as strided views (padded head dim, kv heads interleaved with others): same bits
    nb, bs, hk, d = kc.shape
    big_k = torch.zeros(nb, bs, 2 * hk, d + 16, dtype=kc.dtype)
    big_v = torch.zeros(nb, bs, 2 * hk, d + 16, dtype=kc.dtype)
    big_k[:, :, 1::2, :d] = kc
    big_v[:, :, 1::2, :d] = vc
    kv, vv = big_k[:, :, 1::2, :d], big_v[:, :, 1::2, :d]
    assert not kv.is_contiguous()
    qbig = torch.zeros(q.size(0), HQ, d + 8, dtype=q.dtype)
    qbig[:, :, :d] = q
    out2 = sim.attention(qbig[:, :, :d], kv, vv, qsl, lens, bt, scale)
    assert torch.equal(out2.view(torch.uint8), out.view(torch.uint8))


def test_decode_past_the_split(sim):
    """One decode query at position 519 (seq_len 520 > ATTN_SPLIT = 512: two splits combined)."""
    assert contract.ATTN_SPLIT == 512 and contract.ATTN_TILE_N == 32
    q, kc, vc, qsl, lens, bt = _problem(torch.float32, ctx=(520,), qlens=(1,), seed=7)
    scale = 1.0 / math.sqrt(32)
    out, lse = sim.attention(q, kc, vc, qsl, lens, bt, scale, with_lse=True)
    _check_out_lse(out, lse, q, kc, vc, qsl, lens, bt, scale)
    # the combine is really applied: one 1024-key split (no combine) gives other fp32 bits
    other, other_lse = sim.attention(q, kc, vc, qsl, lens, bt, scale, with_lse=True, split=1024)
    assert not (torch.equal(other.view(torch.int32), out.view(torch.int32))
                and torch.equal(other_lse.view(torch.int32), lse.view(torch.int32)))
    # ... and the same bits as the token's query inside a prefill chunk of 3 with other company
    q3 = torch.cat([torch.randn(2, HQ, 32, generator=torch.Generator().manual_seed(8)).to(q.dtype), q])
    qsl3 = torch.tensor([0, 3], dtype=torch.int32)
    out3 = sim.attention(q3, kc, vc, qsl3, lens, bt, scale)
    assert torch.equal(out3[2].view(torch.uint8), out[0].view(torch.uint8))


def test_padding_tokens(sim):
    q, kc, vc, qsl, lens, bt = _problem(torch.float16, ctx=(12, 20), qlens=(3, 2), pad_front=2, pad_back=3, seed=5)
    scale = 0.2
    out, lse = sim.attention(q, kc, vc, qsl, lens, bt, scale, with_lse=True)
    for t in (0, 1, 7, 8, 9):
        assert bool((out[t] == 0).all()) and bool((lse[t] == 0).all()), f"padding token {t}"
    _check_out_lse(out, lse, q, kc, vc, qsl, lens, bt, scale)
    # no sequence at all: every token is padding
    empty = torch.zeros(0, dtype=torch.int32)
    o0, l0 = sim.attention(q, kc, vc, torch.zeros(1, dtype=torch.int32), empty, bt[:0], scale, with_lse=True)
    assert bool((o0 == 0).all()) and bool((l0 == 0).all())


# ------------------------------------------------------------------------------------------
# Invariance (bitwise)

def _seqs(dtype, lengths, D=32, seed=11):
    g = torch.Generator().manual_seed(seed)
    qs = [(torch.randn(n, HQ, D, generator=g) * 1.5).to(dtype) for n in lengths]
    ks = [(torch.randn(n, HK, D, generator=g) * 1.5).to(dtype) for n in lengths]
    vs = [torch.randn(n, HK, D, generator=g).to(dtype) for n in lengths]
    return qs, ks, vs


def _write(key, value, key_cache, value_cache, slots):
    kv, vv = key_cache.view(-1, *key_cache.shape[2:]), value_cache.view(-1, *value_cache.shape[2:])
    kv[slots] = key
    vv[slots] = value


def _attn_fn(sim, split_of=None):
    def fn(q, kc, vc, qsl, lens, bt, scale):
        scale = 1.0 / math.sqrt(q.size(2)) if scale is None else scale
        split = None if split_of is None else split_of(q.size(0))
        return sim.attention(q, kc, vc, qsl, lens, bt, scale, split=split)
    return fn


def _bits(outs):
    return torch.cat([o.reshape(-1) for o in outs]).view(torch.uint8)


LENGTHS = (37, 14, 6)  # 57 tokens; 37 crosses a tile boundary


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_prefill_chunked_decode_page_size_bitwise(sim, dtype):
    qs, ks, vs = _seqs(dtype, LENGTHS)
    base = T.attention_schedule(_attn_fn(sim), _write, qs, ks, vs, T.prefill_schedule(LENGTHS), block_size=16)
    assert not any(bool(torch.isnan(o).any()) for o in base)
    fails = T.schedule_mismatches(_attn_fn(sim), _write, qs, ks, vs, LENGTHS, chunk=7, prompt=29, block_sizes=(16, 1))
    assert not fails, fails


def test_deterministic_under_both_schedules(sim):
    q, kc, vc, qsl, lens, bt = _problem(torch.bfloat16, seed=21)
    a = sim.attention(q, kc, vc, qsl, lens, bt, 0.2, with_lse=True)
    b = sim.attention(q, kc, vc, qsl, lens, bt, 0.2, with_lse=True)
    with sim.reverse_schedule():
        c = sim.attention(q, kc, vc, qsl, lens, bt, 0.2, with_lse=True)
    for x in (b, c):
        assert torch.equal(x[0].view(torch.uint8), a[0].view(torch.uint8))
        assert torch.equal(x[1].view(torch.int32), a[1].view(torch.int32))


def test_negative_control_split_by_token_count(sim):
    """A variant whose split size depends on the number of tokens in the launch (32 keys for
    decode-sized launches, 512 otherwise) is caught by the prefill == decode comparison."""
    qs, ks, vs = _seqs(torch.float32, LENGTHS, seed=13)
    good = _attn_fn(sim)
    bad = _attn_fn(sim, split_of=lambda ntok: 32 if ntok <= len(LENGTHS) else contract.ATTN_SPLIT)
    pre = T.attention_schedule(good, _write, qs, ks, vs, T.prefill_schedule(LENGTHS), block_size=16)
    dec_bad = T.attention_schedule(bad, _write, qs, ks, vs, T.decode_schedule(LENGTHS, 4), block_size=16)
    dec_good = T.attention_schedule(good, _write, qs, ks, vs, T.decode_schedule(LENGTHS, 4), block_size=16)
    assert torch.equal(_bits(dec_good), _bits(pre))
    assert not torch.equal(_bits(dec_bad), _bits(pre))


# ------------------------------------------------------------------------------------------
# Split-parallel path (one warp per (token, head, split) + the combine kernel): the same bits as
# the sequential path, whatever the launch size chooses.

def _both_paths(sim, args, scale):
    got = {}
    for path in ("sequential", "split"):
        got[path] = sim.attention(*args, scale, with_lse=True, path=path)
        assert sim.last_attention_path() == path
    (o1, l1), (o2, l2) = got["sequential"], got["split"]
    assert torch.equal(o1.view(torch.uint8), o2.view(torch.uint8)), "out bits differ between the paths"
    assert torch.equal(l1.view(torch.int32), l2.view(torch.int32)), "lse bits differ between the paths"
    return o1, l1


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_split_path_equals_sequential_bitwise(sim, dtype):
    # decode past the 512-key split (2 splits) and a multi-split decode (1100 keys: 3 splits, the
    # last one partial), block tables with spare capacity (workspace slots never written)
    for ctx, seed in ((520, 7), (1100, 9)):
        args = _problem(dtype, ctx=(ctx,), qlens=(1,), seed=seed)
        scale = 1.0 / math.sqrt(32)
        out, lse = _both_paths(sim, args, scale)
        _check_out_lse(out, lse, *args, scale)
        # the auto choice for a one-token decode with several splits is the split-parallel path
        auto = sim.attention(*args, scale, with_lse=True)
        assert sim.last_attention_path() == "split"
        assert torch.equal(auto[0].view(torch.uint8), out.view(torch.uint8))


def test_split_path_mixed_batch_padding_and_masked_head(sim):
    # sequences of 1..3 splits, chunked queries crossing the split boundary, a 1-key sequence,
    # padding tokens, D = 48 (masked second register); page size 16
    args = _problem(torch.float16, D=48, ctx=(1100, 515, 40, 1), qlens=(2, 5, 3, 1), pad_front=1, pad_back=2,
                    seed=31)
    out, lse = _both_paths(sim, args, 0.15)
    assert bool((out[0] == 0).all()) and bool((out[-2:] == 0).all()) and bool((lse[0] == 0).all())
    _check_out_lse(out, lse, *args, 0.15)
    # short contexts only (one split of capacity): auto runs the sequential path
    short = _problem(torch.float16, D=48, ctx=(40, 9), qlens=(1, 1), seed=32)
    sim.attention(*short, 0.15)
    assert sim.last_attention_path() == "sequential"


def test_split_path_deterministic_under_both_schedules(sim):
    args = _problem(torch.bfloat16, ctx=(600, 33), qlens=(1, 2), seed=41)
    a = sim.attention(*args, 0.2, with_lse=True, path="split")
    with sim.reverse_schedule():
        b = sim.attention(*args, 0.2, with_lse=True, path="split")
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
    assert torch.equal(a[1].view(torch.int32), b[1].view(torch.int32))


# ------------------------------------------------------------------------------------------
# Device compile check (no GPU needed): the same header through nvcc.

_NVCC_CHECK = Path(__file__).with_name("nvcc_check_attention.cu")


def test_attention_kernel_compiles_with_nvcc_for_sm80_and_sm90a(nvcc, tmp_path):
    # The in-warp kernel parks one pointer in local memory (8-28 bytes of "spills" at 56-80
    # registers, not register pressure): stored once at entry, reloaded after the key loop around
    # the IEEE division's slow-path calls (div_rn); the key loop has no local access (SASS read).
    body = nvcc_check.nvcc_compile(_NVCC_CHECK, tmp_path, allowed_spill_bytes={"attention_fwd_kernel": 32})["90a"]
    assert nvcc_check.ptx_violations(body) == []
    assert "shfl.sync.bfly.b32" in body and "shfl.sync.idx.b32" in body
    assert "ld.local" not in body and "st.local" not in body, "per-lane arrays spilled to local memory"
    # the tensor-core kernels (kernels/attention_mma.cuh, bf16 / fp16 at D = 64 / 128): mma.sync with
    # fp32 accumulators fed by ldmatrix and cp.async, never wgmma; no spills (nvcc_compile refuses them)
    for needle in ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                   "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                   "cp.async.cg.shared.global"):
        assert needle in body, needle
    assert "wgmma" not in body
