"""Triton top-k / top-p mask (triton_kernels/sampling.py): kept set vs the float64 reference and the
CPU backend, ties (at the k-th value, straddling the top-p cut, at the max), -inf / NaN / +inf
inputs, bit copies of kept values, row invariance with per-row parameters, determinism, processed
logprobs, and a negative control.

Under the interpreter (CPU tensors) rows are short (V <= 300: a few 128-wide chunks, so the
multi-chunk path runs); on a GPU (BATCH_INVARIANT_TEST_DEVICE=cuda) V = 151936 (Qwen vocabulary).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import batch_invariant as bi
from batch_invariant import backends
from batch_invariant import testing as T
from batch_invariant.ops.sampling import apply_temperature, top_k_top_p_mask_ref
from batch_invariant.triton_kernels import sampling as ts

NEG_INF = float("-inf")


def _small(device) -> bool:
    return device.type == "cpu"  # the interpreter: ~0.1 s per 128-wide chunk of a row (17 passes)


def _vocab(device) -> int:
    return 300 if _small(device) else 151936


def _logits(rows, vocab, seed, device, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * scale).to(device)


def _cpu_backend_mask(x, k, p):
    """The CPU backend's result for the same inputs (None where the CPU extension is not built)."""
    if backends.backend_unavailable_reason("cpu", "cpu") is not None:
        return None
    bi.set_backend("cpu")
    try:
        return bi.top_k_top_p_mask(x.cpu(), None if k is None else k.cpu(), None if p is None else p.cpu())
    finally:
        bi.set_backend("triton")


def _kept(x):
    return ~(torch.isinf(x) & (x < 0))


def _assert_same_kept_set(got, other, x, k, p, what):
    """The kept sets are equal. Where rows of a realistic vocabulary (GPU sizes only) put 1 - p
    within rounding of a cumulative boundary they may differ (triton_kernels/sampling.py, top-p):
    every disputed entry must then have an exact (float64) cumulative probability within
    (n + 2) * 2^-24 of fp32(1 - p), n = the entries kept by top-k: a bound on the rounding of an
    n-term fp32 running sum of probabilities <= 1 (the CPU's), larger than a blocked sum's."""
    mine, theirs = _kept(got).cpu(), _kept(other).cpu()
    for r in (mine != theirs).any(1).nonzero().flatten().tolist():
        assert not _small(x.device), f"{what}: row {r} keeps a different set"
        assert p is not None and float(p[r]) < 1.0, f"{what}: row {r}: top-k kept sets differ"
        row = x[r].cpu().double()
        vals, order = torch.sort(row, stable=True)
        kk = 0 if k is None else int(k[r])
        if 0 < kk < row.numel():
            vals[vals < vals[row.numel() - kk].item()] = NEG_INF
        cum = torch.cumsum(torch.softmax(vals, 0), 0)
        limit = float(torch.tensor(1.0) - p[r].cpu())  # fp32, as both backends round it
        tol = (int(torch.isfinite(vals).sum()) + 2) * 2.0 ** -24
        disputed = (mine[r] != theirs[r])[order]
        assert bool(((cum[disputed] - limit).abs() <= tol).all()), f"{what}: row {r} differs away from the cut"


def _check_against_ref_and_cpu(x, k, p, got=None):
    """Removed entries are exactly -inf, kept ones are bit copies; the kept set equals the float64
    reference's and the CPU backend's (for the interpreter-sized rows: exact for top-k, cut margins
    >> fp32 rounding for top-p; at GPU sizes see _assert_same_kept_set)."""
    got = bi.top_k_top_p_mask(x, k, p) if got is None else got
    kept = _kept(got)
    assert T.bits_equal(got[kept], x[kept])
    assert bool((got[~kept] == NEG_INF).all())
    cpu_args = (x.cpu(), None if k is None else k.cpu(), None if p is None else p.cpu())
    _assert_same_kept_set(got, top_k_top_p_mask_ref(*cpu_args), x, k, p, "float64 reference")
    cpu = _cpu_backend_mask(x, k, p)
    if cpu is not None:
        _assert_same_kept_set(got, cpu, x, k, p, "cpu backend")
        both = kept.cpu() & _kept(cpu)
        assert T.bits_equal(got.cpu()[both], cpu[both])
    return got


# ------------------------------------------------------------------------------------------
# Correctness


def test_random_rows_match_reference_and_cpu(triton_device):
    V = _vocab(triton_device)
    x = _logits(8, V, 1, triton_device)
    k = torch.tensor([0, 1, 5, 50, V - 1, V, -1, 20], dtype=torch.int64, device=triton_device)
    p = torch.tensor([1.0, 1.0, 0.5, 0.9, 0.3, 0.95, 1e-6, 0.75], dtype=torch.float32, device=triton_device)
    got = _check_against_ref_and_cpu(x, k, p)
    n_kept = _kept(got).sum(1).tolist()
    assert n_kept[0] == V and n_kept[1] == 1 and n_kept[6] == 1  # both off; k = 1; p tiny
    assert all(1 <= n <= min(kk, V) for n, kk in zip(n_kept[2:4], (5, 50)))


def test_ties(triton_device):
    row = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]], device=triton_device)
    one = lambda v, dtype: torch.tensor([v], dtype=dtype, device=triton_device)  # noqa: E731
    cases = [  # (k, p, kept)
        (2, 1.0, [0, 1, 1, 0, 1, 0]),     # the k-th largest (3.0) is tied: every 3.0 stays
        (4, 1.0, [0, 1, 1, 1, 1, 0]),     # threshold 2.0
        (1, 1.0, [0, 1, 1, 0, 1, 0]),     # k = 1 keeps the whole tied max
        (0, 1e-6, [0, 0, 0, 0, 1, 0]),    # p tiny: only the last sorted entry (highest index of the max)
        (1, 1e-6, [0, 0, 0, 0, 1, 0]),
    ]
    for k, p, kept in cases:
        got = _check_against_ref_and_cpu(row, one(k, torch.int64), one(p, torch.float32))
        assert _kept(got)[0].int().tolist() == kept, (k, p)


def test_tie_straddling_the_top_p_cut(triton_device):
    """A tie group where the cut falls after its 2nd member (in the stable ascending order, equal
    values are in index order): exactly its two lowest-index members are removed."""
    V = 40 if _small(triton_device) else 151936
    g = torch.Generator().manual_seed(5)
    x = -8.0 - 4.0 * torch.rand(V, generator=g, dtype=torch.float64)  # below the group, little mass
    group = [3, 11, 17, 25, 38]
    x[group] = 0.0
    x[20], x[30] = 1.5, 1.0
    x = x.float()
    prob = torch.softmax(x.double(), 0)
    q = prob[group[0]].item()
    below = prob[x < 0].sum().item()
    p = 1.0 - (below + 2.5 * q)  # the cut sits half a member's mass past the 2nd member
    got = _check_against_ref_and_cpu(x[None].to(triton_device), None, torch.tensor([p], device=triton_device))
    kept = _kept(got)[0].cpu()
    assert kept[group].tolist() == [False, False, True, True, True]
    assert int(kept.sum()) == 5  # 3 group members + the two larger values


def test_exact_boundary_follows_the_exact_sums(triton_device):
    """A flat row puts 1 - p exactly on cumulative boundaries: the comparison is exact (fp64) on
    fp32 sums that are exact here, so the kept count is the exact-arithmetic one (m/100 <= fp32(1 -
    p) removes m entries). The CPU backend's sequential fp32 cumsum may land on the other side
    (documented in triton_kernels/sampling.py); this pins the Triton definition."""
    x = torch.zeros(3, 100, device=triton_device)
    p = torch.tensor([0.3, 0.1, 0.5], device=triton_device)
    got = bi.top_k_top_p_mask(x, None, p)
    assert _kept(got).sum(1).tolist() == [31, 11, 50]  # fp32(1 - 0.3) < 0.7, fp32(1 - 0.1) < 0.9


def test_tie_group_is_top_p_cut_on_integer_rows(triton_device):
    """Many ties everywhere (integer logits), with k and p on together."""
    V = 150 if _small(triton_device) else 151936
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-4, 5, (4, V), generator=g).float().to(triton_device)
    k = torch.tensor([0, 40, 3, V // 2], dtype=torch.int64, device=triton_device)
    p = torch.tensor([0.6, 0.9, 0.5, 1.0], device=triton_device)
    _check_against_ref_and_cpu(x, k, p)


def test_minus_inf_inputs(triton_device):
    V = 150 if _small(triton_device) else 151936
    x = _logits(4, V, 3, triton_device)
    g = torch.Generator().manual_seed(3)
    x[torch.rand(4, V, generator=g).to(triton_device) < 0.6] = NEG_INF
    x[3] = NEG_INF  # a whole row of -inf: nothing to remove, a copy
    n_finite = int(torch.isfinite(x[0]).sum())
    # k beyond the finite entries: the threshold is -inf, top-k removes nothing.
    k = torch.tensor([n_finite + 5, 10, 0, 5], dtype=torch.int64, device=triton_device)
    p = torch.tensor([0.8, 0.9, 0.5, 0.5], device=triton_device)
    got = _check_against_ref_and_cpu(x, k, p)
    assert T.bits_equal(got[3], x[3])


def test_nan_and_inf_mirror_cpu(triton_device):
    """NaN sorts above +inf; a NaN or +inf among the kept entries makes the CPU's probabilities
    NaN, so top-p removes nothing; NaN payloads of kept entries are copied bit for bit."""
    V = 40 if _small(triton_device) else 151936
    x = _logits(4, V, 4, triton_device)
    x[0, 7] = float("nan")
    x[1, 9] = float("inf")
    x[2, :5] = torch.tensor([-0.0, 0.0, float("nan"), float("nan"), 0.0])
    x[3, 1] = torch.tensor(0x7FC01234, dtype=torch.int32).view(torch.float32)  # NaN with a payload
    k = torch.tensor([5, 5, 2, 0], dtype=torch.int64, device=triton_device)
    p = torch.tensor([0.5, 0.5, 0.5, 1.0], device=triton_device)
    got = bi.top_k_top_p_mask(x, k, p)
    assert int(_kept(got)[0].sum()) == 5 and int(_kept(got)[1].sum()) == 5  # top-k only
    assert T.bits_equal(got[3], x[3])
    cpu = _cpu_backend_mask(x, k, p)
    if cpu is not None:
        assert T.bits_equal(got.cpu(), cpu)


def test_exp_matches_float64(triton_device):
    """The CPU's exp polynomial (max error ~2 ulp per csrc/cpu/common.h), incl. the clamps."""
    @triton.jit
    def _exp_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, ts._exp_f32(tl.load(x_ptr + offs, mask=offs < N)), mask=offs < N)

    g = torch.Generator().manual_seed(6)
    x = torch.cat([torch.rand(2000, generator=g) * 200 - 110,
                   torch.tensor([0.0, -0.0, 88.7, 89.0, -103.9, -104.0, -87.5, float("-inf"), float("inf")])])
    x = x.to(triton_device)
    out = torch.empty_like(x)
    _exp_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024, enable_fp_fusion=False)
    ref = torch.exp(x.double())
    finite = torch.isfinite(out) & (ref < 3.4e38)
    # Reason: the polynomial's documented error (~2 ulp) plus the subnormal spacing below 2^-126.
    ulp = torch.maximum(ref.abs(), torch.full_like(ref, 2.0 ** -126)) * 2.0 ** -23
    assert bool(((out.double() - ref).abs() <= 2 * ulp + 2.0 ** -149)[finite].all())
    assert torch.equal(torch.isinf(out), ref >= 3.4028234663852886e38)


# ------------------------------------------------------------------------------------------
# Invariance and determinism


def _params_of(x):
    """Per-row k and p derived from the row itself, so they move with the row in any batch."""
    V = x.size(1)
    k = (x[:, 0].abs() * 1000).long() % V
    p = 0.3 + 0.7 * (x[:, 1].abs() * 1000 % 1.0)
    p = torch.where(x[:, 2] > 1.5, torch.ones_like(p), p).float()
    return k, p


def test_row_invariance(triton_device):
    V = 200 if _small(triton_device) else 151936
    batches = (1, 2, 3) if _small(triton_device) else (1, 2, 3, 7, 64, 129)
    fails = T.row_invariance_mismatches(lambda x: bi.top_k_top_p_mask(x, *_params_of(x)),
                                        lambda m, s: _logits(m, V, s, triton_device), batch_sizes=batches)
    assert not fails, fails


def test_deterministic(triton_device):
    V = _vocab(triton_device)
    x = _logits(4, V, 8, triton_device)
    k, p = _params_of(x)
    first = bi.top_k_top_p_mask(x, k, p)
    assert T.bits_equal(first, bi.top_k_top_p_mask(x, k, p))
    assert T.permutation_mismatches(lambda rows: bi.top_k_top_p_mask(rows, *_params_of(rows)), x) == []


def test_negative_control(triton_device):
    """A mask that centres the logits on the batch mean first (the same kept set in exact
    arithmetic, but the other rows change the kept values' bits) is caught by the same property."""
    V = 200 if _small(triton_device) else 151936

    def batch_variant(x):
        return bi.top_k_top_p_mask(x - x.mean(), *_params_of(x))

    fails = T.row_invariance_mismatches(batch_variant, lambda m, s: _logits(m, V, s, triton_device),
                                        batch_sizes=(1, 2))
    assert fails


def _misaligned_views(t):
    """Two copies of t starting at element 1 of a bigger buffer (not 16-byte aligned): with
    contiguous strides, and inside rows one element wider (a row stride of another residue mod 16)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    wide = torch.empty(t.size(0), t.size(1) + 1, dtype=t.dtype, device=t.device)[:, 1:]
    return flat.copy_(t), wide.copy_(t)


def test_misaligned_rows_give_the_bits_of_fresh_rows(triton_device, monkeypatch):
    """The top-p sums reduce the loaded row, whose register layout follows what Triton specialises
    on (16-byte alignment of pointers, ints divisible by 16): rows of misaligned views give the bits
    of the same rows in fresh tensors, and every launch gets a fresh tensor's specialisation key
    (the interpreter has no layouts: there the keys check the launcher's plumbing). The launcher is
    called directly: the public op would already copy the strided view."""
    V = 256 if _small(triton_device) else 151936  # multiples of 16
    x = _logits(2, V, 21, triton_device)
    k = torch.tensor([50, 0], dtype=torch.int64, device=triton_device)
    p = torch.tensor([0.9, 0.8], device=triton_device)
    keys, kernel = [], ts._top_k_top_p_kernel

    class Spy:  # records each launch's specialisation key: pointer alignment, ints % 16 and == 1
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                keys.append(tuple(a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor) else (a % 16 == 0, a == 1)
                                  if isinstance(a, int) and not isinstance(a, bool) else None for a in args))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(ts, "_top_k_top_p_kernel", Spy())
    fresh = [ts.top_k_top_p_mask(x[r:r + 1].clone(), k[r:r + 1], p[r:r + 1]) for r in range(2)]
    for view in _misaligned_views(x):
        assert view.data_ptr() % 16 != 0
        got = ts.top_k_top_p_mask(view, k, p)
        for r in range(2):
            assert T.bits_equal(got[r:r + 1], fresh[r]), f"row {r} of a view with strides {view.stride()}"
    assert len(set(keys)) == 1, f"{len(set(keys))} kernel variants"


# ------------------------------------------------------------------------------------------
# Processed logprobs and bad input


def test_processed_logprobs_match_cpu_kept_set(triton_device):
    if not backends.has_kernel("triton", "log_softmax"):
        pytest.skip("the triton backend has no log_softmax kernel here")
    V = 150 if _small(triton_device) else 151936
    x = _logits(4, V, 9, triton_device).bfloat16()
    temp = torch.tensor([1.0, 0.7, 0.0, 1.3], device=triton_device)
    ids = torch.argmax(x.float(), dim=1)  # tokens that are always kept ...
    ids[1] = torch.argmin(x[1].float())   # ... and one that top-k removes: -inf
    got = bi.token_logprobs(x, ids, temperature=temp, top_k=20, top_p=0.9, mode="processed")
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert got[1].item() == NEG_INF and bool(torch.isfinite(got[[0, 2, 3]]).all())
    z = apply_temperature(x, temp)  # the op composition token_logprobs uses
    k = torch.full((4,), 20, dtype=torch.int64, device=triton_device)
    p = torch.full((4,), 0.9, device=triton_device)
    _check_against_ref_and_cpu(z, k, p)
    if backends.backend_unavailable_reason("cpu", "cpu") is None:
        bi.set_backend("cpu")
        try:
            cpu = bi.token_logprobs(x.cpu(), ids.cpu(), temperature=temp.cpu(), top_k=20, top_p=0.9, mode="processed")
        finally:
            bi.set_backend("triton")
        assert torch.equal(torch.isfinite(got.cpu()), torch.isfinite(cpu))
        # Reason: same kept set; the two backends' log_softmax differ by a few fp32 ulps of
        # |z - max| + log(sum) (different exp implementations and reduction trees).
        finite = torch.isfinite(cpu)
        assert T.max_abs_error(got.cpu()[finite], cpu[finite]) <= 1e-5


def test_launcher_inputs(triton_device):
    x = torch.randn(3, 10, device=triton_device)
    k = torch.tensor([2, 0, 5], dtype=torch.int64, device=triton_device)
    p = torch.tensor([1.0, 0.5, 0.9], device=triton_device)
    wide = torch.randn(3, 16, device=triton_device)
    wide[:, :10] = x
    assert T.bits_equal(ts.top_k_top_p_mask(wide[:, :10], k, p), ts.top_k_top_p_mask(x, k, p))  # row stride
    with pytest.raises(TypeError, match="float32"):
        ts.top_k_top_p_mask(x.double(), k, p)
    with pytest.raises(TypeError, match="top_k"):
        ts.top_k_top_p_mask(x, k.int(), p)
    with pytest.raises(TypeError, match="top_p"):
        ts.top_k_top_p_mask(x, k, p[:2])
    empty = ts.top_k_top_p_mask(x[:0], k[:0], p[:0])
    assert empty.shape == (0, 10)
