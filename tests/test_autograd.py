"""Backward of every op: gradients vs float64 autograd of the references, and determinism
(two identical backward passes give identical bits)."""
from __future__ import annotations

import pytest
import torch

import batch_invariant as bi
from batch_invariant import testing as T
from batch_invariant.ops.activation import silu_and_mul_ref
from batch_invariant.ops.norm import rms_norm_ref
from batch_invariant.ops.rope import rotary_embedding_ref


def _leaf(*shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()


def _grads(fn, inputs, seed=123):
    """Gradients of sum(out * fixed random weights) w.r.t. inputs (float64 copies for references)."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    return torch.autograd.grad(loss, [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad])


def _as64(inputs):
    return [i.detach().double().requires_grad_(i.requires_grad) if isinstance(i, torch.Tensor) and i.is_floating_point()
            else i for i in inputs]


# name -> (bi function, float64 reference function, inputs maker, kernel)
CASES = {
    "linear": (lambda x, w, b: bi.linear(x, w, b), lambda x, w, b: x @ w.T + b,
               lambda: (_leaf(2, 7, 333, seed=1), _leaf(65, 333, seed=2, scale=0.05), _leaf(65, seed=3)), "linear"),
    "matmul": (bi.matmul, lambda a, b: a @ b, lambda: (_leaf(9, 100, seed=1), _leaf(100, 33, seed=2)), "linear"),
    "bmm": (bi.bmm, torch.bmm, lambda: (_leaf(3, 9, 40, seed=1), _leaf(3, 40, 5, seed=2)), "bmm_nt"),
    "rms_norm": (lambda x, w: bi.rms_norm(x, w, 1e-5), lambda x, w: rms_norm_ref(x, w, 1e-5),
                 lambda: (_leaf(11, 333, seed=1), _leaf(333, seed=2)), "rms_norm"),
    "fused_add_rms_norm": (lambda x, r, w: bi.fused_add_rms_norm(x, r, w, 1e-5),
                           lambda x, r, w: (rms_norm_ref(x + r, w, 1e-5), x + r),
                           lambda: (_leaf(11, 64, seed=1), _leaf(11, 64, seed=2), _leaf(64, seed=3)), "fused_add_rms_norm"),
    "silu_and_mul": (bi.silu_and_mul, silu_and_mul_ref, lambda: (_leaf(13, 2 * 77, seed=1, scale=3),), "silu_and_mul"),
    "log_softmax": (bi.log_softmax, lambda x: torch.log_softmax(x, -1), lambda: (_leaf(5, 1000, seed=1, scale=3),),
                    "log_softmax"),
    "softmax": (bi.softmax, lambda x: torch.softmax(x, -1), lambda: (_leaf(5, 1000, seed=1, scale=3),), "softmax"),
    "mean": (bi.mean, lambda x: x.mean(-1), lambda: (_leaf(5, 333, seed=1),), "mean"),
    "rotary_embedding": (
        lambda q, k: bi.rotary_embedding(torch.tensor([0, 3, 9, 100]), q, k, 64, bi.rope_cos_sin_cache(32, 128), True),
        lambda q, k: rotary_embedding_ref(torch.tensor([0, 3, 9, 100]), q, k, 64, bi.rope_cos_sin_cache(32, 128), True),
        lambda: (_leaf(4, 4 * 64, seed=1), _leaf(4, 2 * 64, seed=2)), "rotary_embedding"),
}


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_float64(require, name):
    fn, ref, make, kernel = CASES[name]
    require("cpu", kernel)
    inputs = make()
    got = _grads(fn, inputs)
    want = _grads(ref, _as64(inputs))
    for g, w in zip(got, want):
        # Reason: fp32 forward/backward vs float64: relative error of a few hundred fp32 ulps of the
        # gradient's scale (sums over <= a few hundred terms, exp/rsqrt ~2 ulp each).
        scale = float(w.abs().max()) + 1e-12
        assert T.max_abs_error(g, w) <= 2e-5 * scale, f"{name}: {T.max_abs_error(g, w)} vs scale {scale}"


@pytest.mark.parametrize("name", CASES)
def test_backward_is_deterministic(require, name):
    fn, _, make, kernel = CASES[name]
    require("cpu", kernel)
    first = _grads(fn, make())
    second = _grads(fn, make())
    assert all(T.bits_equal(a, b) for a, b in zip(first, second))
    if name in ("linear", "rms_norm"):
        assert not T.thread_count_mismatches(lambda: torch.cat([g.flatten() for g in _grads(fn, make())]))


def test_bf16_linear_backward_rounds_once(require):
    require("cpu", "linear")
    x, w = _leaf(8, 64, seed=1, dtype=torch.bfloat16), _leaf(16, 64, seed=2, dtype=torch.bfloat16)
    gx, gw = _grads(lambda a, b: bi.linear(a, b), (x, w))
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    x64, w64 = _as64((x, w))
    rx, rw = _grads(lambda a, b: a @ b.T, (x64, w64))
    # Reason: fp32 accumulation rounded once to bf16: <= 1 bf16 ulp of the largest gradient.
    assert T.max_abs_error(gx, rx) <= 2 ** -7 * float(rx.abs().max())
    assert T.max_abs_error(gw, rw) <= 2 ** -7 * float(rw.abs().max())


def _paged(lengths, hq, hk, d, dtype, seed):
    """Packed sequences on a page-size-1 cache (the trainer's layout) as leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = (torch.randn(t, hq, d, generator=g)).to(dtype).requires_grad_()
    k = (torch.randn(t, 1, hk, d, generator=g)).to(dtype).requires_grad_()
    v = (torch.randn(t, 1, hk, d, generator=g)).to(dtype).requires_grad_()
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    table = torch.zeros(len(lengths), max(lengths), dtype=torch.int32)
    for b, n in enumerate(lengths):
        table[b, :n] = torch.arange(starts[b], starts[b] + n)
    meta = (torch.tensor(starts, dtype=torch.int32), torch.tensor(lengths, dtype=torch.int32), table)
    return q, k, v, meta


def _attention_ref64(q, k, v, meta):
    from batch_invariant.ops.attention import attention_ref
    # differentiable float64 reference: per sequence masked softmax over its own keys
    qsl, lens, _ = meta
    outs = []
    group = q.size(1) // k.size(2)
    for b in range(lens.numel()):
        s, e = int(qsl[b]), int(qsl[b + 1])
        kk = k[s:e, 0].repeat_interleave(group, 1)
        vv = v[s:e, 0].repeat_interleave(group, 1)
        sc = torch.einsum("thd,jhd->htj", q[s:e], kk) / q.size(-1) ** 0.5
        mask = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        sc = sc.masked_fill(~mask, float("-inf"))
        outs.append(torch.einsum("htj,jhd->thd", torch.softmax(sc, -1), vv))
    assert attention_ref is not None
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_gradients_match_float64(require, dtype):
    require("cpu", "attention_backward")
    q, k, v, meta = _paged([1, 40, 700], 8, 2, 64, dtype, 1)
    fn = lambda q, k, v: bi.attention(q, k, v, *meta)  # noqa: E731
    got = _grads(fn, (q, k, v))
    want = _grads(lambda q, k, v: _attention_ref64(q, k, v, meta), _as64((q, k, v)))
    for g, w in zip(got, want):
        # Reason: fp32 recomputation (exp ~2 ulp, sums over <= 700 keys); bf16: one rounding of
        # the gradient plus bf16 inputs to the softmax (rel. ~2^-8 of the gradient's scale).
        tol = (2 ** -7 if dtype == torch.bfloat16 else 1e-5) * float(w.abs().max())
        assert T.max_abs_error(g, w) <= tol


def test_attention_backward_deterministic_and_matches_lse_path(require):
    require("cpu", "attention_backward")
    q, k, v, meta = _paged([33, 600], 4, 4, 64, torch.bfloat16, 2)
    fn = lambda q, k, v: bi.attention(q, k, v, *meta)  # noqa: E731
    first = _grads(fn, (q, k, v))
    assert all(T.bits_equal(a, b) for a, b in zip(first, _grads(fn, (q, k, v))))
    # the op without saved lse (recomputes it) gives the same gradients
    plain = _grads(lambda q, k, v: torch.ops.batch_invariant.attention(q, k, v, *meta, 0.125), (q, k, v))
    assert all(T.bits_equal(a, b) for a, b in zip(first, plain))
    assert not T.thread_count_mismatches(lambda: torch.cat([g.flatten() for g in _grads(fn, (q, k, v))]))
    with torch.no_grad():
        assert T.bits_equal(bi.attention(q, k, v, *meta), fn(q, k, v).detach())
