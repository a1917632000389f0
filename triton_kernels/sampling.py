"""vLLM's top-k / top-p mask in Triton, without a sort: one program per row, radix searches.

Definition (compare csrc/cpu/kernels/sampling.h, the CPU backend, step by step). Per row z[0..V):

1. Order. Every value gets the CPU's order-preserving 32-bit key (-0 and +0 equal, every NaN one
   key above +inf), held here as a signed int32 (CPU key - 2^31, same order). The stable ascending
   order is "by key, then by index", as the CPU's stable radix sort.
2. top-k (0 < k < V): thr = the key of ascending rank V - k, found by a radix search over the key
   bits (8 digits of 4 bits, one pass over the row per digit, counting keys below 16 candidates;
   counts are exact integers). Keys < thr are removed, ties with thr kept; a NaN thr removes
   nothing. This is exactly the CPU's threshold: the top-k kept set is always identical.
3. top-p (p < 1), over the entries kept by top-k. As on the CPU, a row whose kept entries contain
   NaN or +inf, or are all -inf, gets no top-p removal (the CPU's probabilities are NaN there).
   Otherwise mx = the row max (the same value as the CPU's), e_i = exp_f32(z_i - mx) with the
   CPU's exp polynomial operation by operation (bit-identical e_i), and
     s      = sum of e_i over the kept entries (fp32; lane j of a BLOCK-wide accumulator takes
              index c*BLOCK + j, chunks c in order, then one tl.sum: a tree fixed by BLOCK),
     limit  = (1 - p) * s, with 1 - p rounded to fp32 as the CPU's limit and the product exact
              (fp64): the CPU's test "sum of e_i / s <= 1 - p", unnormalised,
     B(t)   = sum of e_i over kept entries with key < t (the "mass strictly below t", fp32).
   The cut key t' = the largest key <= the row's max key with B(t') <= limit (compared in fp64,
   exactly), found by the same radix search (B is monotone in t: fixed-order sums of non-negative
   terms). B is accumulated digit by digit: the mass below the candidate chosen at one digit plus
   the fp32 sum over the next digit's range (same lane structure as s). Then:
     key < t'  -> removed;  key > t' -> kept;
     key == t' -> the group straddling the cut. Its m-th member in index order (m = 1, 2, ...)
                  is removed iff B(t') + m * e(t') <= limit (fp64: m * e exact) -- the cumulative
                  sum of the stable order inside a tie group, as the CPU's sequential c_i --
                  except the last sorted entry (the highest index of the max key), never removed.
   The removed set is a prefix of the same stable order as the CPU's. The CPU computes
   c_i = c_{i-1} + fp32(e_i / s) sequentially in sorted order and compares in fp32; here the same
   cumulative masses are blocked fp32 sums compared exactly. So the top-p kept set equals the
   CPU's except where rounding decides: when the exact cumulative mass at the cut is within the
   accumulated fp32 rounding of either side (relative ~1e-7 for random rows, V * 2^-24 at worst)
   of 1 - p. That does happen at exact boundaries: a flat row of V = 100 with p = 0.3 keeps 31
   entries here (as the exact sums and the float64 reference), 30 on the CPU, whose running sum
   of fp32(1/100) stays <= fp32(1 - p) one entry longer. Both are deterministic; random rows agree.
4. Removed entries become exactly -inf; kept entries are bit copies of the input (the row is
   moved as int32 bits, NaN payloads included); k and p both off: a plain copy.

Invariance: one program per row; BLOCK and num_warps are functions of V (and the device kind)
only; every reduction is either an exact integer count or a fixed-order fp32 sum; no atomics. The
logits get the kernel variant of a fresh tensor (_launch.canonical_layout): the fp32 sums' trees
follow the load layout, which must not depend on a view's alignment or row stride.
All launches pass enable_fp_fusion=False, so exp_f32's separate multiplies/adds are not contracted
and the interpreter and a GPU compute the same e_i (only tl.sum's tree differs between them).

Cost: up to 17 streamed passes over the row when both filters are on (1 max + 7 top-k digits +
8 top-p digits + 1 write); top-p digit passes skip the exp work of chunks with no key in the
digit's range. One row per program: fine for a batch of rows, latency-bound for a single row.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _launch

#: Candidate thresholds per radix digit (4 bits per digit, 8 digits for a 32-bit key).
_DIGIT_BITS = 4
_CANDIDATES = 1 << _DIGIT_BITS

_f32 = lambda v: float(np.float32(v))  # noqa: E731  the CPU's fp32 constants, exactly
# csrc/cpu/common.h, namespace expc.
_LOG2E = tl.constexpr(_f32(1.44269504088896341))
_LN2_HI = tl.constexpr(_f32(0.693145751953125))
_LN2_LO = tl.constexpr(_f32(1.428606765330187045e-06))
_EXP_MAX = tl.constexpr(_f32(88.72283935546875))
_EXP_MIN = tl.constexpr(_f32(-103.972076416))
_C2, _C3, _C4 = tl.constexpr(0.5), tl.constexpr(_f32(1.6666667163e-01)), tl.constexpr(_f32(4.1666537523e-02))
_C5, _C6, _C7 = tl.constexpr(_f32(8.3333477378e-03)), tl.constexpr(_f32(1.3887316594e-03)), tl.constexpr(_f32(1.9845665677e-04))
#: 1.5 * 2^23: (y + R) - R rounds |y| < 2^22 to the nearest integer, ties to even (= nearbyint).
_ROUNDER = tl.constexpr(12582912.0)

#: Signed keys: CPU key - 2^31.
_KEY_MIN = tl.constexpr(-(1 << 31))          # below every present key (a NaN pattern's slot)
_KEY_NEG_INF = tl.constexpr(-2139095041)     # 0xff800000 ^ 0x7fffffff as int32: key of -inf
_KEY_POS_INF = tl.constexpr(0x7F800000)
_KEY_NAN = tl.constexpr(0x7FC00000)          # every NaN
_NEG_INF_BITS = tl.constexpr(-8388608)       # 0xff800000 as int32


@triton.jit
def _exp_f32(x):
    """csrc/cpu/common.h exp_f32, operation for operation (needs enable_fp_fusion=False)."""
    nan = x != x
    big = x > _EXP_MAX
    small = x < _EXP_MIN
    xc = tl.where(nan | big | small, 0.0, x)
    n = (xc * _LOG2E + _ROUNDER) - _ROUNDER
    r = tl.fma(n, -_LN2_HI, xc)
    r = tl.fma(n, -_LN2_LO, r)
    p = tl.fma(tl.full(r.shape, _C7, tl.float32), r, _C6)
    p = tl.fma(p, r, _C5)
    p = tl.fma(p, r, _C4)
    p = tl.fma(p, r, _C3)
    p = tl.fma(p, r, _C2)
    p = tl.fma(p, r, 1.0)
    p = tl.fma(p, r, 1.0)
    ni = n.to(tl.int32)
    n1 = (ni + (ni < 0).to(tl.int32)) >> 1  # trunc(n / 2), as C's integer division
    n2 = ni - n1
    s1 = ((n1 + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((n2 + 127) << 23).to(tl.float32, bitcast=True)
    res = (p * s1) * s2
    res = tl.where(big, float("inf"), res)
    res = tl.where(small, 0.0, res)
    return tl.where(nan, x, res)


@triton.jit
def _sort_key(bits):
    """Order-preserving signed key of fp32 bits: -0 -> +0, every NaN -> one key above +inf."""
    z = bits.to(tl.float32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(z != z, _KEY_NAN, key)
    return tl.where(z == 0.0, 0, key)


@triton.jit
def _key_value(key):
    """The fp32 value of a (non-NaN) key: the inverse of _sort_key."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pick_digit(passes, digits, totals):
    """The largest digit whose candidate passes (digit 0 always does), and its total."""
    best = tl.max(tl.where(passes, digits, 0), axis=0)
    return best, tl.sum(tl.where(digits == best, totals, tl.zeros_like(totals)), axis=0)


@triton.jit
def _top_k_top_p_kernel(bits_ptr, row_stride, top_k_ptr, top_p_ptr, out_ptr, V,
                        BLOCK: tl.constexpr, NC: tl.constexpr, DIGIT_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = bits_ptr + row * row_stride
    dst = out_ptr + row * V
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, NC)
    digits64 = digits.to(tl.int64)
    TOP: tl.constexpr = 32 - DIGIT_BITS  # shift of the first (most significant) digit
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    use_k = (k > 0) & (k < V)
    rank = tl.where(use_k, V - k, 0).to(tl.int32)  # ascending rank of the top-k threshold

    # Pass 1: the row's max key, and the counts of top-k's first digit.
    first = ((digits64 << TOP) + _KEY_MIN).to(tl.int32)
    key_max_acc = tl.full([BLOCK], _KEY_MIN, tl.int32)
    counts = tl.zeros([NC, BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        inside = cols < V
        key = tl.where(inside, _sort_key(tl.load(src + cols, mask=inside, other=0)), _KEY_MIN)
        key_max_acc = tl.maximum(key_max_acc, key)
        counts += ((key[None, :] < first[:, None]) & inside[None, :]).to(tl.int32)
    key_max = tl.max(key_max_acc, axis=0)

    # top-k: radix select of the key of ascending rank `rank` (the largest t with #(key < t) <= rank).
    thr = tl.full([], _KEY_MIN, tl.int64)  # keys >= thr survive top-k
    if use_k:
        total = tl.sum(counts, axis=1)
        digit, below = _pick_digit(total <= rank, digits, total)
        prefix = (digit.to(tl.int64) << TOP) + _KEY_MIN
        for level in range(1, 32 // DIGIT_BITS):
            shift = TOP - DIGIT_BITS * level
            cand = (prefix + (digits64 << shift)).to(tl.int32)
            low = prefix.to(tl.int32)
            counts = tl.zeros([NC, BLOCK], dtype=tl.int32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                inside = cols < V
                key = _sort_key(tl.load(src + cols, mask=inside, other=0))
                counts += ((key[None, :] < cand[:, None]) & (inside & (key >= low))[None, :]).to(tl.int32)
            total = below + tl.sum(counts, axis=1)
            digit, below = _pick_digit(total <= rank, digits, total)
            prefix = prefix + (digit.to(tl.int64) << shift)
        if prefix != _KEY_NAN:  # a NaN threshold removes nothing (x < NaN is false)
            thr = prefix
    thr32 = thr.to(tl.int32)

    # top-p: NaN / +inf among the kept entries (they are >= every key, so kept) or an all -inf
    # row make the CPU's probabilities NaN: nothing removed.
    use_p = (p < 1.0) & (key_max > _KEY_NEG_INF) & (key_max < _KEY_POS_INF)
    cut = tl.full([], _KEY_MIN, tl.int64)  # keys < cut are removed (_KEY_MIN: none)
    below_mass = tl.zeros([], dtype=tl.float32)
    limit = tl.zeros([], dtype=tl.float64)
    n_max = tl.zeros([], dtype=tl.int32)
    mx = _key_value(key_max)
    if use_p:
        # First digit, fused with the row sum s (both need only mx).
        sum_acc = tl.zeros([BLOCK], dtype=tl.float32)
        mass = tl.zeros([NC, BLOCK], dtype=tl.float32)
        n_max_acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            inside = cols < V
            bits = tl.load(src + cols, mask=inside, other=0)
            key = _sort_key(bits)
            e = tl.where(inside & (key >= thr32), _exp_f32(bits.to(tl.float32, bitcast=True) - mx), 0.0)
            sum_acc += e
            mass += tl.where(key[None, :] < first[:, None], e[None, :], 0.0)
            n_max_acc += (inside & (key == key_max)).to(tl.int32)
        # fp32 1 - p as the CPU's limit; the product with s and the comparisons in fp64, exact.
        limit = (1.0 - p).to(tl.float64) * tl.sum(sum_acc, axis=0).to(tl.float64)
        n_max = tl.sum(n_max_acc, axis=0)
        total = tl.sum(mass, axis=1)
        digit, below_mass = _pick_digit((first <= key_max) & (total.to(tl.float64) <= limit), digits, total)
        prefix = (digit.to(tl.int64) << TOP) + _KEY_MIN
        for level in range(1, 32 // DIGIT_BITS):
            shift = TOP - DIGIT_BITS * level
            cand = (prefix + (digits64 << shift)).to(tl.int32)
            low = tl.maximum(prefix, thr).to(tl.int32)
            high = (prefix + (tl.full([], NC, tl.int64) << shift) - 1).to(tl.int32)  # last key of this digit's range
            mass = tl.zeros([NC, BLOCK], dtype=tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                inside = cols < V
                bits = tl.load(src + cols, mask=inside, other=0)
                key = _sort_key(bits)
                in_range = inside & (key >= low) & (key <= high)
                # Skipping a chunk with nothing in range adds exactly the +0s it would have added.
                if tl.max(in_range.to(tl.int32), axis=0) > 0:
                    e = tl.where(in_range, _exp_f32(bits.to(tl.float32, bitcast=True) - mx), 0.0)
                    mass += tl.where(key[None, :] < cand[:, None], e[None, :], 0.0)
            total = below_mass + tl.sum(mass, axis=1)
            digit, below_mass = _pick_digit((cand <= key_max) & (total.to(tl.float64) <= limit), digits, total)
            prefix = prefix + (digit.to(tl.int64) << shift)
        cut = prefix
    cut32 = cut.to(tl.int32)
    e_cut = _exp_f32(_key_value(cut32) - mx)  # the mass of one member of the straddling group
    cut_is_max = cut32 == key_max

    # Write pass: -inf for removed entries, the input bits for kept ones.
    seen = tl.zeros([], dtype=tl.int32)  # members of the straddling group in earlier chunks
    for start in range(0, V, BLOCK):
        cols = start + offs
        inside = cols < V
        bits = tl.load(src + cols, mask=inside, other=0)
        key = _sort_key(bits)
        group = inside & (key == cut32)  # empty without top-p: no key equals _KEY_MIN
        member = seen + tl.cumsum(group.to(tl.int32), axis=0)  # 1-based rank in index order
        seen += tl.sum(group.to(tl.int32), axis=0)
        cum = below_mass.to(tl.float64) + member.to(tl.float64) * e_cut.to(tl.float64)
        drop_member = group & (cum <= limit) & ~(cut_is_max & (member == n_max))
        removed = (key < thr32) | (key < cut32) | drop_member
        tl.store(dst + cols, tl.where(removed, _NEG_INF_BITS, bits), mask=inside)


# ------------------------------------------------------------------------------------------
# Launcher

def _config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) from V and the device kind only, never from the number of rows.

    GPU: 2048-wide chunks over 16 warps: the [16, BLOCK] per-lane accumulators are 64 registers
    per thread (ptxas, sm_90: 127 registers, no spills, so one 16-warp program per SM) and 8 KiB
    of loads are in flight per chunk. The interpreter takes 128-wide chunks so that
    interpreter-sized rows (V of a few hundred) exercise the multi-chunk path."""
    block = max(_launch.row_block(vocab, cap=128 if _launch.arch_key(device) == "interpreter" else 2048), 16)
    return block, 16 if block >= 2048 else 8 if block >= 1024 else 4 if block >= 256 else 2 if block >= 64 else 1


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, V]``: ``logits`` with the top-k / top-p removed entries set to -inf (a new tensor).

    ``top_k`` int64 ``[T]`` (<= 0 or >= V: off), ``top_p`` fp32 ``[T]`` (>= 1: off).
    """
    _launch.check_device("top_k_top_p_mask", logits, top_k, top_p)
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise TypeError(f"logits must be a 2-d float32 tensor [T, V], got shape {tuple(logits.shape)}, "
                        f"dtype {logits.dtype}")
    rows, vocab = logits.shape
    for name, t, dtype in (("top_k", top_k, torch.int64), ("top_p", top_p, torch.float32)):
        if t.dim() != 1 or t.size(0) != rows or t.dtype != dtype:
            raise TypeError(f"{name} must be a 1-d {dtype} tensor with one entry per row of logits ({rows}), "
                            f"got shape {tuple(t.shape)}, dtype {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if vocab >= 2 ** 31:
        raise ValueError(f"logits: V = {vocab} is too large (int32 counts)")
    out = torch.empty((rows, vocab), dtype=torch.float32, device=logits.device)
    if rows == 0 or vocab == 0:
        return out
    # The row sums of top-p (s and the digit masses, tl.sum over BLOCK-wide accumulators) reduce
    # loaded data: the rows get the kernel variant of a fresh tensor (also a contiguous last dim).
    logits = _launch.canonical_layout(logits)
    # top_k / top_p are read one scalar per row (their alignment cannot change a bit); made
    # canonical too, so that one compiled kernel variant serves every call.
    top_k, top_p = _launch.canonical_layout(top_k), _launch.canonical_layout(top_p)
    block, warps = _config(vocab, logits.device)
    _top_k_top_p_kernel[(rows,)](
        logits.view(torch.int32), logits.stride(0), top_k, top_p,
        out.view(torch.int32), vocab, BLOCK=block, NC=_CANDIDATES, DIGIT_BITS=_DIGIT_BITS,
        num_warps=warps, enable_fp_fusion=False)
    return out


KERNELS = {"top_k_top_p_mask": top_k_top_p_mask}
