"""Triton paged attention forward through the public API: correctness vs float64 (out and lse) and
the scheduling invariance properties (prefill == chunked prefill == decode, page size and shuffled
block tables, company, padding tokens, both work splits, the split boundary of the real contract
constants), determinism, and a negative control (a split-KV decode path that the properties catch).

Interpreter-sized on CPU (TRITON_INTERPRET=1); realistic sizes on CUDA (BATCH_INVARIANT_TEST_DEVICE=cuda).
The KV cache is written with plain torch indexing here, so these tests depend on the attention
kernel only (write_kv_cache has its own tests).
"""
from __future__ import annotations

import math

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.contract import ATTN_SPLIT
from batch_invariant.ops.attention import attention_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: unit roundoff of each dtype (half an ulp, relative)
UNIT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}

# The interpreter evaluates masked-out lanes too (rows of padding / key-less rows: exp(-inf+inf),
# 0/0, log 0); the kernels never store them, and the tests check that no NaN reaches an output.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


def _cpu(device) -> bool:
    return device.type == "cpu"


def _kernels():
    from batch_invariant.triton_kernels import attention as kernels
    return kernels


def _seqs(lengths, hq, hk, head, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    mk = lambda n, h: (torch.randn(n, h, head, generator=g) * 2).to(dtype).to(device)  # noqa: E731
    return [mk(n, hq) for n in lengths], [mk(n, hk) for n in lengths], [mk(n, hk) for n in lengths]


def _torch_write(key, value, key_cache, value_cache, slots):
    """The cache write as plain indexing (works on strided cache views too); slots < 0 skipped."""
    keep = slots >= 0
    slots, size = slots[keep], key_cache.size(1)
    key_cache[slots // size, slots % size] = key[keep]
    value_cache[slots // size, slots % size] = value[keep]


def _run(schedule, q, k, v, block_size, seed=0, fn=None):
    return T.attention_schedule(fn or bi.attention, _torch_write, q, k, v, schedule, block_size=block_size,
                                shuffle_seed=seed)


def _launcher(**private):
    """The triton launcher with test-only options (a work split, a non-contract split size)."""
    def fn(q, key_cache, value_cache, qsl, seq_lens, table, scale):
        scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
        return _kernels().attention(q, key_cache, value_cache, qsl, seq_lens, table, scale, **private)
    return fn


def _ref_one(q, k, v):
    """float64 reference of one whole sequence (cache = its keys, one token per block)."""
    n = q.size(0)
    return attention_ref(q.cpu().double(), k.cpu().double().unsqueeze(1), v.cpu().double().unsqueeze(1),
                         torch.tensor([0, n]), torch.tensor([n]), torch.arange(n).view(1, n))


def _out_bound(dtype, n, v):
    # Reason: out is a convex combination of the v_j, so every error is relative to max|v|:
    # P is rounded to the KV dtype before the P@V MMA (<= u*max|v|), the result is rounded once
    # to the dtype (<= u*max|v|), and the fp32 softmax (exp ~2 ulp, sums over <= n terms) adds
    # <= n*2^-22*max|v| (covers fp16 subnormal probabilities too).
    return (2 * UNIT[dtype] + n * 2.0 ** -22) * float(v.double().abs().max())


def _shapes(device):
    if _cpu(device):  # (Hq, Hk, D): GQA 2; and GQA 3 with a head size that is not a power of two
        return [(4, 2, 32), (6, 2, 24)], [1, 17, 70]
    return [(32, 8, 128), (28, 4, 128), (16, 2, 80), (8, 4, 256)], [1, 33, 700, 1100]  # ref runs on the host


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_float64(triton_device, require, dtype):
    require("triton", "attention")
    shapes, lengths = _shapes(triton_device)
    for hq, hk, head in shapes:
        q, k, v = _seqs(lengths, hq, hk, head, dtype, 1, triton_device)
        outs = _run(T.prefill_schedule(lengths), q, k, v, block_size=16)
        for b, n in enumerate(lengths):
            err = T.max_abs_error(outs[b].cpu(), _ref_one(q[b], k[b], v[b]))
            assert err <= _out_bound(dtype, n, v[b].cpu()), f"{(hq, hk, head)} sequence {b} (len {n}): error {err}"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_attention_with_lse(triton_device, require, dtype):
    require("triton", "attention_with_lse")
    hq, hk, head = (4, 2, 32) if _cpu(triton_device) else (32, 8, 128)
    lengths = [3, 40] if _cpu(triton_device) else [3, 40, 700]
    q, k, v = _seqs(lengths, hq, hk, head, dtype, 2, triton_device)
    captured = []

    def with_lse(qq, kc, vc, qsl, lens, table, scale):
        out, lse = torch.ops.batch_invariant.attention_with_lse(qq, kc, vc, qsl, lens, table, 1.0 / math.sqrt(head))
        assert lse.dtype == torch.float32 and lse.shape == qq.shape[:2]
        captured.append(lse)
        return out

    outs = _run(T.prefill_schedule(lengths), q, k, v, 16, fn=with_lse)
    plain = _run(T.prefill_schedule(lengths), q, k, v, 16)
    lse, start = captured[0].cpu().double(), 0
    scale = 1.0 / math.sqrt(head)
    for b, n in enumerate(lengths):
        assert T.bits_equal(outs[b], plain[b]), "attention_with_lse changed the output bits"
        qb, kb = q[b].cpu().double(), k[b].cpu().double().repeat_interleave(hq // hk, dim=1)
        s = torch.einsum("thd,jhd->thj", qb, kb) * scale
        s = s.masked_fill(torch.arange(n)[None, None, :] > torch.arange(n)[:, None, None], float("-inf"))
        ref = torch.logsumexp(s, -1)
        # Reason: q.k is an fp32 dot of exact products (<= (D+1)*2^-24 * sum|q_d k_d| * scale), the
        # fp32 softmax sum has relative error <= n*2^-22 (abs error in log), one rounding of M+log L.
        dot_mag = torch.einsum("thd,jhd->thj", qb.abs(), kb.abs()).max().item() * scale
        bound = (head + 1) * 2.0 ** -24 * dot_mag + n * 2.0 ** -22 + 2.0 ** -23 * ref.abs().max().item()
        assert T.max_abs_error(lse[start:start + n], ref) <= bound
        start += n


def _schedule_variants(lengths, cpu):
    chunks = (7, 32) if cpu else (1, 7, 32, 100, 513)
    variants = {f"chunk {c}": (T.chunked_schedule(lengths, c), 16, 0) for c in chunks}
    prompt = 28 if cpu else 5  # cpu: decode steps cross the tile boundaries 32 and 64
    variants["decode"] = (T.decode_schedule(lengths, prompt), 16, 0)
    for size in (1, 16, 32):
        variants[f"page {size} shuffled"] = (T.prefill_schedule(lengths), size, 7)
    return variants


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunked_decode_identical(triton_device, require, dtype):
    """The same tokens give the same bits whatever the scheduler does (tile tails 31/32/33)."""
    require("triton", "attention")
    cpu = _cpu(triton_device)
    hq, hk, head = (4, 2, 16) if cpu else (32, 8, 128)
    lengths = [1, 31, 33, 70] if cpu else [1, 31, 32, 33, 200, 1100]
    if cpu and dtype != torch.bfloat16:
        lengths = [33, 70]  # interpreter time: the full sweep runs once (bf16)
    q, k, v = _seqs(lengths, hq, hk, head, dtype, 3, triton_device)
    base = _run(T.prefill_schedule(lengths), q, k, v, block_size=16)
    alone = [_run(T.prefill_schedule([n]), [q[b]], [k[b]], [v[b]], 16)[0] for b, n in enumerate(lengths)]
    for b in range(len(lengths)):
        assert T.bits_equal(alone[b], base[b]), f"sequence {b}: alone vs batched differ"
    variants = _schedule_variants(lengths, cpu)
    if cpu and dtype != torch.bfloat16:
        variants = {name: variants[name] for name in ("chunk 7", "decode", "page 1 shuffled")}
    for name, (schedule, size, seed) in variants.items():
        outs = _run(schedule, q, k, v, size, seed)
        for b in range(len(lengths)):
            assert T.bits_equal(outs[b], base[b]), f"{name}: sequence {b} (len {lengths[b]}) differs"


def test_split_boundary_and_work_splits(triton_device, require):
    """Real contract constants across the split boundary (keys 0..511 | 512..): a chunked prefill,
    decode steps and a fully split-parallel run give the same bits, and the result matches
    float64. Both work splits (in-register fold; workspace + combine kernel) are compared: forced
    either way, and by default (single-token decode launches take the split-parallel one)."""
    require("triton", "attention")
    cpu = _cpu(triton_device)
    hq, hk, head = (2, 1, 16) if cpu else (32, 8, 128)  # cpu: one kv head (interpreter time)
    lengths = [ATTN_SPLIT + 18, 3] if cpu else [ATTN_SPLIT + 18, 3, 2100, 4100]
    dtype = torch.bfloat16
    q, k, v = _seqs(lengths, hq, hk, head, dtype, 4, triton_device)
    # a first step up to 5 tokens before each sequence's last split boundary, then the rest
    tails = [n % ATTN_SPLIT + 5 if n > ATTN_SPLIT else 0 for n in lengths]
    first = [[(b, n - t) for b, (n, t) in enumerate(zip(lengths, tails))]]
    chunked = first + [[(b, t) for b, t in enumerate(tails) if t]]
    decode = first + [[(b, 1) for b, t in enumerate(tails) if t > i] for i in range(max(tails))]
    base = _run(chunked, q, k, v, 16, fn=_launcher(_split_parallel=False))
    runs = {
        "decode across the boundary, default work split": _run(decode, q, k, v, 32, 5),
        "split-parallel work split": _run(chunked, q, k, v, 16, 1, fn=_launcher(_split_parallel=True)),
    }
    if not cpu:
        fused = _launcher(_split_parallel=False)
        runs["prefill, fused work split"] = _run(T.prefill_schedule(lengths), q, k, v, 16, fn=fused)
        runs["decode, fused work split"] = _run(decode, q, k, v, 16, fn=fused)
    for name, outs in runs.items():
        for b, n in enumerate(lengths):
            assert T.bits_equal(outs[b], base[b]), f"{name}: sequence {b} (len {n}) differs"
    for b, n in enumerate(lengths[:2]):  # the float64 reference runs on the host: the short ones
        assert T.max_abs_error(base[b].cpu(), _ref_one(q[b], k[b], v[b])) <= _out_bound(dtype, n, v[b].cpu())


def test_company_and_determinism(triton_device, require):
    """A sequence's bits do not depend on the other sequences' data, nor on the run."""
    require("triton", "attention")
    cpu = _cpu(triton_device)
    hq, hk, head = (4, 2, 16) if cpu else (32, 8, 128)
    lengths = [50, 9, 7] if cpu else [50, 300, 7, 3000]
    q, k, v = _seqs(lengths, hq, hk, head, torch.bfloat16, 5, triton_device)
    base = _run(T.prefill_schedule(lengths), q, k, v, 16)
    again = _run(T.prefill_schedule(lengths), q, k, v, 16)
    assert all(T.bits_equal(a, b) for a, b in zip(base, again)), "two identical runs differ"
    q2, k2, v2 = _seqs(lengths, hq, hk, head, torch.bfloat16, 6, triton_device)
    q2[1], k2[1], v2[1] = q[1], k[1], v[1]
    other = _run(T.prefill_schedule(lengths), q2, k2, v2, 16, seed=3)
    assert T.bits_equal(other[1], base[1])


def test_many_sequences(triton_device, require):
    """More sequences than one chunk of the kernels' sequence lookup (128): every token finds its
    sequence, and the bits do not depend on the order of the sequences in the batch."""
    require("triton", "attention")
    g = torch.Generator().manual_seed(11)
    lengths = (torch.randint(1, 3, (130,), generator=g) if _cpu(triton_device)
               else torch.randint(1, 300, (600,), generator=g)).tolist()
    q, k, v = _seqs(lengths, 2, 1, 16, torch.float32, 12, triton_device)
    outs = _run(T.prefill_schedule(lengths), q, k, v, 16)
    rev = _run(T.prefill_schedule(lengths[::-1]), q[::-1], k[::-1], v[::-1], 16, seed=4)[::-1]
    for b, n in enumerate(lengths):
        assert T.bits_equal(outs[b], rev[b]), f"sequence {b} depends on its place in the batch"
    for b, n in list(enumerate(lengths))[::7]:
        assert T.max_abs_error(outs[b].cpu(), _ref_one(q[b], k[b], v[b])) <= _out_bound(torch.float32, n, v[b].cpu())


def test_padding_tokens_and_empty_sequences(triton_device, require):
    """Tokens outside query_start_loc[0] .. query_start_loc[B] get 0 (out and lse); sequences with
    no queries (seq_len 0 or a context only) are skipped; the real rows keep their bits."""
    require("triton", "attention_with_lse")
    dev, hq, hk, head, bs = triton_device, 4, 2, 16, 16
    q, k, v = _seqs([9, 3], hq, hk, head, torch.float16, 7, dev)
    kc = torch.randn(4, bs, hk, head).to(torch.float16).to(dev)
    vc = torch.randn(4, bs, hk, head).to(torch.float16).to(dev)
    kc[2, :9], vc[2, :9] = k[0], v[0]
    kc[0, :3], vc[0, :3] = k[1], v[1]
    idx = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    # token 0 and tokens 7..9 are padding; sequence 0: no queries, seq_len 0; sequence 2: context only
    q_pad = torch.cat([torch.randn(1, hq, head).half().to(dev), q[0][4:], q[1][2:],
                       torch.randn(3, hq, head).half().to(dev)])
    qsl, lens, table = idx([1, 1, 6, 6, 7]), idx([0, 9, 5, 3]), idx([[3, 3], [2, 1], [1, 1], [0, 3]])
    scale = 0.25
    for split_parallel in (False, True):
        out, lse = _kernels().attention_with_lse(q_pad, kc, vc, qsl, lens, table, scale, _split_parallel=split_parallel)
        assert int(out[[0, 7, 8, 9]].ne(0).sum()) == 0 and int(lse[[0, 7, 8, 9]].ne(0).sum()) == 0
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        alone0 = _kernels().attention_with_lse(q[0][4:], kc, vc, idx([0, 5]), idx([9]), idx([[2, 1]]), scale)
        alone1 = _kernels().attention_with_lse(q[1][2:], kc, vc, idx([0, 1]), idx([3]), idx([[0, 3]]), scale)
        assert T.bits_equal(out[1:6], alone0[0]) and T.bits_equal(lse[1:6], alone0[1])
        assert T.bits_equal(out[6:7], alone1[0]) and T.bits_equal(lse[6:7], alone1[1])


def test_large_gqa_group(triton_device, require):
    """More query heads per kv head than rows of a tile (the heads are chunked): still exact
    schedule invariance and float64 agreement."""
    require("triton", "attention")
    lengths = [20, 5]
    q, k, v = _seqs(lengths, 66, 1, 16, torch.float32, 8, triton_device)
    base = _run(T.prefill_schedule(lengths), q, k, v, 16)
    dec = _run(T.decode_schedule(lengths, 17), q, k, v, 8, 2)
    for b, n in enumerate(lengths):
        assert T.bits_equal(dec[b], base[b])
        assert T.max_abs_error(base[b].cpu(), _ref_one(q[b], k[b], v[b])) <= _out_bound(torch.float32, n, v[b].cpu())


def test_strided_engine_cache_views(triton_device, require):
    """Caches that are views of one engine buffer ([blocks, 2, block, Hk, D]) give the same bits
    as separate contiguous caches."""
    require("triton", "attention")
    lengths = [40, 5]
    q, k, v = _seqs(lengths, 4, 2, 32, torch.bfloat16, 9, triton_device)
    base = _run(T.prefill_schedule(lengths), q, k, v, 16)
    buf = torch.zeros(8, 2, 16, 2, 32, dtype=torch.bfloat16, device=triton_device)
    kc, vc = buf[:, 0], buf[:, 1]
    assert not kc.is_contiguous()
    outs = T.attention_schedule(lambda qq, _k, _v, *rest: bi.attention(qq, kc, vc, *rest),
                                lambda key, value, _k, _v, slots: _torch_write(key, value, kc, vc, slots),
                                q, k, v, T.prefill_schedule(lengths), block_size=16)
    for a, b in zip(outs, base):
        assert T.bits_equal(a, b)


def test_misaligned_q_and_caches(triton_device, require):
    """q and the caches as views at element 1 of bigger buffers (not 16-byte aligned: Triton
    compiles another variant, with narrower loads) give the same bits: the kernel's reductions run
    on tl.dot outputs (MMA layouts, whatever the loads' layout), so the launcher copies nothing.
    A real check on a GPU; in the interpreter, of the plumbing."""
    require("triton", "attention")
    lengths = [40, 5]
    q, k, v = _seqs(lengths, 4, 2, 32, torch.bfloat16, 9, triton_device)
    base = _run(T.prefill_schedule(lengths), q, k, v, 16)

    def misaligned(shape):
        return torch.zeros(math.prod(shape) + 1, dtype=torch.bfloat16, device=triton_device)[1:].view(shape)

    kc, vc = misaligned((8, 16, 2, 32)), misaligned((8, 16, 2, 32))

    def attend(qq, _k, _v, *rest):
        q_view = misaligned(qq.shape).copy_(qq)
        assert q_view.data_ptr() % 16 and kc.data_ptr() % 16
        return bi.attention(q_view, kc, vc, *rest)

    outs = T.attention_schedule(attend, lambda key, value, _k, _v, slots: _torch_write(key, value, kc, vc, slots),
                                q, k, v, T.prefill_schedule(lengths), block_size=16)
    for a, b in zip(outs, base):
        assert T.bits_equal(a, b)


def test_negative_control_split_kv_decode(triton_device, require):
    """A split-KV decode heuristic (smaller splits when the launch has a single query token, as
    flash-decoding kernels do) is caught: decode differs from prefill on the same case."""
    require("triton", "attention")
    lengths = [40]
    q, k, v = _seqs(lengths, 4, 2, 16, torch.float32, 10, triton_device)
    contract, small = _launcher(), _launcher(_split=32)

    def variant(qq, *rest):
        return (small if qq.size(0) == 1 else contract)(qq, *rest)

    base = _run(T.prefill_schedule(lengths), q, k, v, 16, fn=variant)
    dec = _run(T.decode_schedule(lengths, 30), q, k, v, 16, fn=variant)
    assert not T.bits_equal(dec[0], base[0]), "the property did not catch a decode-specific split size"
    honest = _run(T.decode_schedule(lengths, 30), q, k, v, 16, fn=contract)
    assert T.bits_equal(honest[0], base[0])


def test_attention_bad_input(triton_device, require):
    require("triton", "attention")
    dev = triton_device
    kc = torch.zeros(4, 8, 2, 16, device=dev)
    qsl = torch.tensor([0, 3], dtype=torch.int32, device=dev)
    lens = torch.tensor([3], dtype=torch.int32, device=dev)
    table = torch.zeros(1, 2, dtype=torch.int32, device=dev)
    big = torch.zeros(4, 8, 2, 512, device=dev)
    with pytest.raises(ValueError, match="head size"):
        bi.attention(torch.randn(3, 4, 512, device=dev), big, big, qsl, lens, table)
    with pytest.raises(TypeError, match="int32"):
        _kernels().attention(torch.randn(3, 4, 16, device=dev), kc, kc, qsl.long(), lens, table, 0.25)
    with pytest.raises(ValueError, match="split"):
        _kernels().attention(torch.randn(3, 4, 16, device=dev), kc, kc, qsl, lens, table, 0.25, _split=48)
    if _cpu(dev):  # metadata checks cost a device sync: done where they are free (interpreter)
        with pytest.raises(ValueError, match="seq_lens"):
            bi.attention(torch.randn(3, 4, 16), kc, kc, qsl, torch.tensor([2], dtype=torch.int32), table)
        with pytest.raises(ValueError, match="block_table"):
            bi.attention(torch.randn(3, 4, 16), kc, kc, qsl, lens, torch.full((1, 2), 9, dtype=torch.int32))
