"""Triton attention backward (``attention_backward``, and autograd through ``bi.attention``).

Gradients vs float64 autograd of ``attention_ref`` (per dtype, a stated bound), run-to-run
determinism, a sequence's gradients alone vs in company (bitwise: its dq rows and the dk/dv of its
cache slots), page size 1 vs 16 (bitwise, per logical position), zero-filled outputs like the CPU
backend's, end-to-end autograd with the Triton forward, and a negative control (dK/dV summed in
two parts split at a point that depends on the sequence's index in the batch, as atomics or a
batch-dependent split would do) that the company check catches. Interpreter-sized on CPU
(D 16, Hq 4 / Hk 2, <= 44 tokens); realistic sizes on CUDA (BATCH_INVARIANT_TEST_DEVICE=cuda).
"""
from __future__ import annotations

import math

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.attention import attention_ref

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: unit roundoff of each dtype (half an ulp at 1)
UNIT = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -12, torch.float32: 2.0 ** -24}


def _sizes(device):
    """(q heads, kv heads, head size, sequences as (queries, context)). The sequences: a short
    prompt, a chunk after cached context, a single decode-like query, a longer prompt."""
    if device.type == "cpu":
        return 4, 2, 16, [(5, 5), (7, 20), (1, 9), (23, 23)]
    return 32, 8, 128, [(200, 200), (64, 600), (1, 333), (450, 450)]


class Seq:
    """One sequence's tensors (float64, already rounded to the dtype): q and dO [n, Hq, D], k/v
    [ctx, Hk, D], and its forward output / lse from float64 (a function of its seed only)."""

    def __init__(self, n, ctx, hq, hk, d, dtype, seed):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).double()

        self.n, self.ctx = n, ctx
        self.q, self.k, self.v, self.d_out = rnd(n, hq, d), rnd(ctx, hk, d), rnd(ctx, hk, d), rnd(n, hq, d)
        group, scale = hq // hk, 1.0 / math.sqrt(d)
        k, v = self.k.repeat_interleave(group, 1), self.v.repeat_interleave(group, 1)
        s = torch.einsum("thd,jhd->thj", self.q, k) * scale
        pos = ctx - n + torch.arange(n)
        s = s.masked_fill(torch.arange(ctx)[None, None, :] > pos[:, None, None], float("-inf"))
        self.lse = torch.logsumexp(s, -1)
        self.out = torch.einsum("thj,jhd->thd", torch.softmax(s, -1), v).to(dtype).double()


class Batch:
    """Sequences packed in `order`, two NaN padding tokens at the end, their K/V in a paged cache
    of `page_size` with shuffled blocks (`layout_seed`); unused cache slots hold NaN."""

    def __init__(self, seqs, page_size, dtype, device, layout_seed=0, pad_tokens=2):
        hk, d = seqs[0].k.shape[1:]
        self.seqs, self.page_size, self.dtype = seqs, page_size, dtype
        need = [-(-s.ctx // page_size) for s in seqs]
        num_blocks = sum(need) + 3
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(layout_seed)).tolist()
        k_cache = torch.full((num_blocks, page_size, hk, d), float("nan"), dtype=torch.float64)
        v_cache = k_cache.clone()
        table = torch.full((len(seqs), max(need) + 1), num_blocks - 1, dtype=torch.int32)
        self.slots, cursor = [], 0  # per sequence: (block, offset) of each logical key
        for b, (s, n) in enumerate(zip(seqs, need)):
            table[b, :n] = torch.tensor(order[cursor:cursor + n], dtype=torch.int32)
            cursor += n
            j = torch.arange(s.ctx)
            blocks, offs = table[b].long()[j // page_size], j % page_size
            k_cache[blocks, offs], v_cache[blocks, offs] = s.k, s.v
            self.slots.append((blocks, offs))

        def pad(x):
            return torch.cat([x, torch.full((pad_tokens,) + x.shape[1:], float("nan"), dtype=x.dtype)])

        self.qsl = [0]
        for s in seqs:
            self.qsl.append(self.qsl[-1] + s.n)
        cat = lambda name: pad(torch.cat([getattr(s, name) for s in seqs]))  # noqa: E731
        self.q64, self.d_out64, self.out64, self.lse64 = cat("q"), cat("d_out"), cat("out"), cat("lse")
        self.k64, self.v64 = k_cache, v_cache
        lens = torch.tensor([s.ctx for s in seqs], dtype=torch.int32)
        self.meta64 = (torch.tensor(self.qsl, dtype=torch.int32), lens, table)
        dev = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        self.args = (dev(self.d_out64), dev(self.q64), dev(self.k64), dev(self.v64), dev(self.out64),
                     self.lse64.to(device=device, dtype=torch.float32)) + tuple(m.to(device) for m in self.meta64)
        self.scale = 1.0 / math.sqrt(d)

    def backward(self):
        return torch.ops.batch_invariant.attention_backward(*self.args, self.scale)

    def rows(self, b, t):
        """Sequence b's rows of a [T, ...] tensor."""
        return t[self.qsl[b]:self.qsl[b + 1]]

    def slots_of(self, b, cache):
        """Sequence b's logical keys [ctx, Hk, D] of a cache-shaped tensor."""
        blocks, offs = self.slots[b]
        return cache[blocks.to(cache.device), offs.to(cache.device)]

    def ref_grads(self):
        """float64 autograd of attention_ref (padding rows get no gradient)."""
        q, k, v = (t.clone().requires_grad_() for t in (self.q64, self.k64, self.v64))
        out = attention_ref(q, k, v, *self.meta64, self.scale)
        real = self.qsl[-1]
        (out[:real] * self.d_out64[:real]).sum().backward()
        return q.grad, k.grad, v.grad


def _make(device, dtype, page_size, layout_seed=0, which=None, order=None):
    hq, hk, d, specs = _sizes(device)
    seqs = [Seq(n, ctx, hq, hk, d, dtype, seed=100 + i) for i, (n, ctx) in enumerate(specs)]
    if which is not None:
        seqs = [seqs[i] for i in which]
    if order is not None:
        seqs = [seqs[i] for i in order]
    return Batch(seqs, page_size, dtype, device, layout_seed)


def _bound(ref, dtype):
    """Per-element error bound vs float64 (u = the dtype's unit roundoff, scale = max |gradient|).
    Output rounding: <= u of the element (x1.01). fp32: the recomputation (exp, products and sums
    over <= ctx keys / queries in fp32, lse given in fp32) stays within 100 u of the scale (the CPU
    backend's fp32 test allows 1e-5 = 168 u; measured here: ~4 u). bf16/fp16: P and dS are rounded
    to the dtype as tensor-core operands (<= u per term), and Delta = dO.O uses the forward's
    output rounded to the dtype (<= u per term, entering every dS of the row): 8 u of the scale
    (measured: <= 3.9 u, the CPU backend 3.8 u, which shares the rounded O)."""
    scale = float(ref.abs().max())
    if dtype == torch.float32:
        return ref.abs() * UNIT[dtype] * 1.01 + 100 * UNIT[dtype] * scale
    return ref.abs() * UNIT[dtype] * 1.01 + 8 * UNIT[dtype] * scale


def _assert_close(got, ref, dtype, what):
    err = (got.double().cpu() - ref).abs()
    bound = _bound(ref, dtype)
    assert bool((err <= bound).all()), f"{what}: max error {float(err.max()):.3g}, worst ratio " \
                                       f"{float((err / bound).max()):.3g} of the bound"


@pytest.mark.parametrize("page_size", (1, 16))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_float64(triton_device, dtype, page_size):
    batch = _make(triton_device, dtype, page_size)
    dq, dk, dv = batch.backward()
    assert (dq.dtype, dk.dtype, dv.dtype) == (dtype,) * 3
    assert dq.shape == batch.args[1].shape and dk.shape == dv.shape == batch.args[2].shape
    for got, ref, name in zip((dq, dk, dv), batch.ref_grads(), ("dq", "dk", "dv")):
        _assert_close(got, ref, dtype, f"{name} {dtype} page {page_size}")


def test_matches_cpu_backend_layout_and_zero_fill(triton_device, require):
    """Same shapes, dtypes and contiguity as the CPU extension; exact zeros where nothing reads
    (padding tokens, unused cache slots, NaN-filled); values within the float64 bound of each."""
    require("cpu", "attention_backward")
    batch = _make(triton_device, torch.bfloat16, 16)
    got = batch.backward()
    bi.set_backend("cpu")
    try:
        cpu = torch.ops.batch_invariant.attention_backward(*(a.cpu() for a in batch.args), batch.scale)
    finally:
        bi.set_backend("triton")
    touched = torch.zeros(batch.k64.shape[:2], dtype=torch.bool)
    for b in range(len(batch.seqs)):
        touched[batch.slots[b]] = True
    real = batch.qsl[-1]
    for g, c in zip(got, cpu):
        assert g.shape == c.shape and g.dtype == c.dtype and g.is_contiguous() and c.is_contiguous()
        assert not g.isnan().any()
    assert bool((got[0][real:] == 0).all()) and bool((cpu[0][real:] == 0).all())
    for g, c in zip(got[1:], cpu[1:]):
        assert bool((g.cpu()[~touched] == 0).all()) and bool((c[~touched] == 0).all())
    for g, c, ref in zip(got, cpu, batch.ref_grads()):
        _assert_close(g, ref, torch.bfloat16, "triton")
        _assert_close(c, ref, torch.bfloat16, "cpu")


def test_deterministic(triton_device):
    batch = _make(triton_device, torch.bfloat16, 16)
    first, second = batch.backward(), batch.backward()
    assert all(T.bits_equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------
# Batch invariance (bitwise)

def _seq_grads(batch, grads, b):
    dq, dk, dv = grads
    return batch.rows(b, dq), batch.slots_of(b, dk), batch.slots_of(b, dv)


#: (order of the sequences in the batch, block layout seed) of the company batches
COMPANIES = (((0, 1, 2, 3), 5), ((3, 2, 1, 0), 6))


def _company_mismatches(device, dtype, backward=None, targets=(1, 3), companies=COMPANIES) -> list[str]:
    """Sequences 1 (a chunk after cached context) and 3 (a prompt) alone vs in company of the
    others: other positions in the batch, other block layouts (page size 16)."""
    backward = backward or (lambda batch: batch.backward())
    alone = {t: _make(device, dtype, 16, layout_seed=1, which=[t]) for t in targets}
    want = {t: _seq_grads(batch, backward(batch), 0) for t, batch in alone.items()}
    failures = []
    for order, layout in companies:
        batch = _make(device, dtype, 16, layout_seed=layout, order=order)
        grads = backward(batch)
        for t in targets:
            got = _seq_grads(batch, grads, order.index(t))
            for name, g, w in zip(("dq", "dk", "dv"), got, want[t]):
                if not T.bits_equal(g, w):
                    failures.append(f"sequence {t} in batch {order}: {name} differs by up to "
                                    f"{T.max_abs_error(g, w):.3g}")
    return failures


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_sequence_alone_vs_in_company(triton_device, dtype):
    assert _company_mismatches(triton_device, dtype) == []


def test_page_size_does_not_change_bits(triton_device):
    """The reduction order is per logical position: page size 1 and 16 (and other block layouts)
    give the same dq bits and the same dk/dv bits per logical key."""
    small, large = (_make(triton_device, torch.bfloat16, p, layout_seed=p) for p in (1, 16))
    grads_small, grads_large = small.backward(), large.backward()
    assert T.bits_equal(grads_small[0], grads_large[0])
    for b in range(len(small.seqs)):
        for g_small, g_large in zip(_seq_grads(small, grads_small, b)[1:], _seq_grads(large, grads_large, b)[1:]):
            assert T.bits_equal(g_small, g_large)


def _batch_split_backward(batch):
    """Negative control: dK/dV of each sequence summed (fp32) from two launches over its queries
    split at a point that depends on the sequence's index in the batch -- a valid decomposition,
    in a batch-dependent order (like atomics or a split chosen from the batch)."""
    dq_rows, parts = [], []
    d_out, q, kc, vc, out, lse, qsl, lens, table = batch.args
    for part in (0, 1):
        rows, starts, ctxs = [], [0], []
        for b, s in enumerate(batch.seqs):
            cut = min(s.n - 1, 2 + 3 * b) if s.n > 1 else s.n
            lo, hi = (0, cut) if part == 0 else (cut, s.n)
            rows.append(torch.arange(batch.qsl[b] + lo, batch.qsl[b] + hi))
            starts.append(starts[-1] + hi - lo)
            ctxs.append(s.ctx - s.n + hi)
        idx = torch.cat(rows).to(q.device)
        meta = (torch.tensor(starts, dtype=torch.int32, device=q.device),
                torch.tensor(ctxs, dtype=torch.int32, device=q.device), table)
        dq, dk, dv = torch.ops.batch_invariant.attention_backward(d_out[idx], q[idx], kc, vc, out[idx], lse[idx], *meta,
                                                                  batch.scale)
        full_dq = torch.zeros_like(q)
        full_dq[idx] = dq
        dq_rows.append(full_dq)
        parts.append((dk, dv))
    return dq_rows[0] + dq_rows[1], parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]


def test_negative_control_batch_dependent_split_is_caught(triton_device):
    dtype = torch.float32  # fp32 outputs: the two partial sums are added unrounded
    batch = _make(triton_device, dtype, 16)
    # The variant is a correct gradient (only the summation order differs) ...
    for got, ref in zip(_batch_split_backward(batch), batch.ref_grads()):
        _assert_close(got, ref, dtype, "split variant")
    # ... and the company check sees that order change.
    assert _company_mismatches(triton_device, dtype, _batch_split_backward, targets=(1,), companies=COMPANIES[:1])


# ------------------------------------------------------------------------------------------
# Layout: Delta = rowsum(dO * O) reduces loaded tiles, whose register layout follows what Triton
# specialises on (pointer 16-byte alignment, ints divisible by 16): dO and O are made canonical.

def _misaligned_views(t):
    """Two copies of t starting at element 1 of a bigger buffer (not 16-byte aligned): with
    contiguous strides, and inside a last dim one element wider (other stride residues mod 16)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    wide = torch.empty(t.shape[:-1] + (t.size(-1) + 1,), dtype=t.dtype, device=t.device)[..., 1:]
    return flat.copy_(t), wide.copy_(t)


def _spy_launch_keys(monkeypatch, module, names):
    """Records each launch's specialisation key (per kernel name): pointer 16-byte alignment, ints
    divisible by 16 / equal to 1. Equal keys = the same compiled variant."""
    keys = {name: [] for name in names}

    def spy(name, kernel):
        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    keys[name].append(tuple(
                        a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1)
                        if isinstance(a, int) and not isinstance(a, bool) else None for a in args))
                    return kernel[grid](*args, **kwargs)
                return launch
        return Spy()

    for name in names:
        monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    return keys


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_misaligned_inputs_give_the_bits_of_fresh_ones(triton_device, monkeypatch, dtype):
    """dO and O as views at element 1 of bigger buffers (flat, and with strides of other residues)
    give the gradients of fresh tensors and the same kernel variants (in the interpreter, which has
    no layouts, the keys check the launcher's plumbing); q and the caches, which only feed tl.dot,
    as misaligned views give the same bits too (a real check on a GPU). The launcher is called
    directly: the public op would already copy the strided views."""
    from batch_invariant.triton_kernels import attention_bwd as kernels

    batch = _make(triton_device, dtype, 16, which=[1])
    d_out, q, kc, vc, out, lse, qsl, lens, table = batch.args
    keys = _spy_launch_keys(monkeypatch, kernels, ("_dq_kernel", "_dkdv_kernel"))
    want = kernels.attention_backward(*batch.args, batch.scale)
    for d_out_view, out_view in zip(_misaligned_views(d_out), _misaligned_views(out)):
        got = kernels.attention_backward(d_out_view, q, kc, vc, out_view, lse, qsl, lens, table, batch.scale)
        assert all(T.bits_equal(g, w) for g, w in zip(got, want)), f"dO/O strides {d_out_view.stride()}"
    assert all(len(set(k)) == 1 for k in keys.values()), {name: len(set(k)) for name, k in keys.items()}
    q_view, kc_view, vc_view = (_misaligned_views(t)[0] for t in (q, kc, vc))
    got = kernels.attention_backward(d_out, q_view, kc_view, vc_view, out, lse, qsl, lens, table, batch.scale)
    assert all(T.bits_equal(g, w) for g, w in zip(got, want)), "misaligned q / caches"


# ------------------------------------------------------------------------------------------
# End to end through autograd (with the Triton forward)

@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_autograd_through_bi_attention(triton_device, require, dtype):
    require("triton", "attention_with_lse")
    batch = _make(triton_device, dtype, 16)
    _, q0, kc0, vc0, _, _, qsl, lens, table = batch.args
    real = batch.qsl[-1]
    weights = batch.args[0].clone()
    weights[real:] = 0  # the padding rows' outputs are unspecified; they get no gradient

    def grads(op):
        q, kc, vc = (t.detach().clone().requires_grad_() for t in (q0, kc0, vc0))
        out = op(q, kc, vc)
        out.backward(weights)
        return out.detach(), (q.grad, kc.grad, vc.grad)

    out, first = grads(lambda q, kc, vc: bi.attention(q, kc, vc, qsl, lens, table))
    _, again = grads(lambda q, kc, vc: bi.attention(q, kc, vc, qsl, lens, table))
    _, plain = grads(lambda q, kc, vc: torch.ops.batch_invariant.attention(q, kc, vc, qsl, lens, table, batch.scale))
    assert all(T.bits_equal(a, b) for a, b in zip(first, again))
    assert all(T.bits_equal(a, b) for a, b in zip(first, plain))  # lse saved or recomputed: same bits
    # The autograd wiring: the same bits as the kernel called with the forward's out and lse.
    out2, lse = torch.ops.batch_invariant.attention_with_lse(q0, kc0, vc0, qsl, lens, table, batch.scale)
    assert T.bits_equal(out2[:real], out[:real])
    direct = torch.ops.batch_invariant.attention_backward(weights, q0, kc0, vc0, out2, lse, qsl, lens, table,
                                                          batch.scale)
    assert all(T.bits_equal(a, b) for a, b in zip(first, direct))
    # float64 reference with these upstream gradients (the forward's own rounding of out enters
    # Delta: bounded by one more unit roundoff per term, inside the bound's scale term).
    q, k, v = (t.clone().requires_grad_() for t in (batch.q64, batch.k64, batch.v64))
    (attention_ref(q, k, v, *batch.meta64, batch.scale)[:real] * weights[:real].double().cpu()).sum().backward()
    for got, ref, name in zip(first, (q.grad, k.grad, v.grad), ("dq", "dk", "dv")):
        _assert_close(got, ref, dtype, f"autograd {name}")


# ------------------------------------------------------------------------------------------
# Input checks

def test_bad_inputs(triton_device):
    from batch_invariant.triton_kernels.attention_bwd import attention_backward

    batch = _make(triton_device, torch.bfloat16, 16, which=[0])
    d_out, q, kc, vc, out, lse, qsl, lens, table = batch.args
    with pytest.raises(ValueError, match="lse"):
        attention_backward(d_out, q, kc, vc, out, lse.double(), qsl, lens, table, batch.scale)
    with pytest.raises(TypeError, match="key_cache"):
        attention_backward(d_out, q, kc.float(), vc, out, lse, qsl, lens, table, batch.scale)
    with pytest.raises(ValueError, match="contiguous last dim"):
        attention_backward(d_out, q.transpose(0, 2).contiguous().transpose(0, 2), kc, vc, out, lse, qsl, lens, table,
                           batch.scale)
    with pytest.raises(ValueError, match="seq_lens"):
        attention_backward(d_out, q, kc, vc, out, lse, qsl, lens.long(), table, batch.scale)
    if triton_device.type == "cpu":  # metadata values are checked on the host only for CPU tensors
        with pytest.raises(ValueError, match="seq_lens"):
            attention_backward(d_out, q, kc, vc, out, lse, qsl, lens - 5, table, batch.scale)
    empty = attention_backward(d_out[:0], q[:0], kc, vc, out[:0], lse[:0], qsl[:1] * 0, lens[:0], table[:0],
                               batch.scale)
    assert empty[0].shape == (0,) + q.shape[1:] and bool((empty[1] == 0).all()) and bool((empty[2] == 0).all())
