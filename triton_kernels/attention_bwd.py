"""Triton backward of the batch-invariant paged causal attention (GQA, vLLM V1 metadata).

FlashAttention-2 style recomputation from the forward's log-sum-exp, deterministic, no atomics:

* ``_dq_kernel``: one program per (query tile, query head). It computes
  ``Delta_i = sum_d dO_i[d] * O_i[d]`` (fp32) for its rows, stores it for the second kernel, then
  walks the key tiles 0, 1, ... up to its last row and accumulates
  ``dQ_i = scale * sum_j dS_ij K_j`` with ``P_ij = exp(scale * q_i.k_j - lse_i)``,
  ``dS_ij = P_ij * (dO_i.v_j - Delta_i)``.
* ``_dkdv_kernel``: one program per (key tile, kv head). It walks the query tiles that can see its
  keys in ascending order and, inside each, the ``G = Hq / Hk`` query heads of its kv head in
  ascending order: ``dV_j = sum_i P_ij dO_i``, ``dK_j = scale * sum_i dS_ij Q_i``.

Why this is batch-invariant: tiles are cut at *absolute positions* of the sequence (query tile m =
positions ``[m*BLOCK_Q, (m+1)*BLOCK_Q)``, key tile n = logical keys ``[n*BLOCK_KEYS, ...)``), each
product tile goes through one ``tl.dot`` that is added to an fp32 accumulator in that fixed tile
order, and the tile sizes / warps are chosen from (head size, dtype, arch) only. Even the slot a
row or key takes inside its tile (position mod tile size) is fixed, so nothing relies on the MMA
treating every row alike. So every gradient element is a fixed function of the sequence's own
positions and values: it does not depend on the other sequences of the batch, on where the
sequence's tokens sit in ``q``, on the page size or on the block table. Masked entries (rows
outside the sequence, keys after the query) enter the dots as exact zeros (+0 / -0 products added
to an accumulator that started at +0), which change no bits.
Programs never share an output element, so there is nothing to combine across programs. The
grids are upper bounds computed from shapes (programs past the real tile count exit at once) and
the program -> (sequence, tile) map is a binary search over device-side prefix sums: no host sync.

Not supported: two sequences with queries that share a physical cache block (prefix sharing). Their
programs would write the same dK/dV slots and the result is undefined (last writer wins). The
trainer never shares blocks. The CPU backend sums such blocks in a fixed order instead. Metadata
values (block ids, lengths) are checked on the host for CPU tensors only (on a GPU that would cost
a sync; the forward pass has already used the same metadata).

Delta's row sum is the one reduction over loaded data (the rest are tl.dot products, whose MMA
layouts do not follow the loads): the launcher gives dO and O the kernel variant of fresh tensors
(_launch.canonical_layout), so that a view at another alignment cannot change its tree.

Precision: fp32 inputs use IEEE fp32 dots (never TF32). bf16/fp16 inputs feed the tensor cores
with bf16/fp16 operands (P and dS rounded to the input dtype for their dots, as in FlashAttention),
accumulating in fp32; all elementwise work is fp32. Outputs are rounded once to the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _launch, interpreter


@triton.jit
def _dot(a, b):
    """a @ b with an fp32 accumulator; fp32 operands in IEEE fp32 (the contract: never TF32)."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _find_sequence(tile, tile_starts_ptr, num_seqs):
    """The sequence b with ``tile_starts[b] <= tile < tile_starts[b + 1]`` (binary search over the
    prefix sums of tiles per sequence; empty sequences have equal starts and are skipped)."""
    lo = tile * 0
    hi = lo + num_seqs  # (a tensor even when num_seqs is specialised to the constant 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        below = tl.load(tile_starts_ptr + mid) <= tile
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _tile_sequence(tile, tile_starts_ptr, query_start_loc_ptr, seq_lens_ptr, num_seqs):
    """For a program's tile: its sequence, that sequence's first query row, query count and context
    length, and the tile's index within the sequence."""
    seq = _find_sequence(tile, tile_starts_ptr, num_seqs)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    ctx = tl.load(seq_lens_ptr + seq)
    return seq, q_start, q_len, ctx, tile - tl.load(tile_starts_ptr + seq)


@triton.jit
def _load_kv_tile(cache_ptr, table_row_ptr, key_pos, key_valid, kv_head, page_size,
                  stride_block, stride_slot, stride_head, offs_d, d_valid):
    """Keys (or values) at logical positions ``key_pos`` of one sequence, gathered through its
    block table row: ``[BLOCK_KEYS, BLOCK_D]`` in the cache dtype, zeros where invalid."""
    block = tl.load(table_row_ptr + key_pos // page_size, mask=key_valid, other=0).to(tl.int64)
    slot = (key_pos % page_size).to(tl.int64)
    ptrs = (cache_ptr + block[:, None] * stride_block + slot[:, None] * stride_slot
            + kv_head.to(tl.int64) * stride_head + offs_d[None, :])
    return tl.load(ptrs, mask=key_valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _dq_kernel(q_ptr, do_ptr, o_ptr, lse_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr,
               query_start_loc_ptr, seq_lens_ptr, tile_starts_ptr, dq_ptr, delta_ptr,
               num_seqs, page_size, scale,
               stride_qt, stride_qh, stride_dot, stride_doh, stride_ot, stride_oh, stride_lt, stride_lh,
               stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
               stride_dqt, stride_dqh,
               NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_Q: tl.constexpr, BLOCK_KEYS: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // NUM_HEADS
    head = pid % NUM_HEADS
    if tile >= tl.load(tile_starts_ptr + num_seqs):
        return  # the grid is an upper bound on the number of query tiles (no host sync)
    seq, q_start, q_len, ctx, nth = _tile_sequence(tile, tile_starts_ptr, query_start_loc_ptr, seq_lens_ptr,
                                                   num_seqs)
    first_pos = ctx - q_len
    # Query tiles are aligned to absolute positions, not to the sequence's first query; the last
    # tile (the most keys to visit) goes to the first program of the sequence.
    m = (ctx - 1) // BLOCK_Q - nth
    pos = m * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_valid = (pos >= first_pos) & (pos < ctx)
    token = (q_start + pos - first_pos).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_SIZE
    row_mask = row_valid[:, None] & d_valid[None, :]

    q = tl.load(q_ptr + token[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=row_mask, other=0.0)
    d_out = tl.load(do_ptr + token[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=row_mask,
                    other=0.0)
    out = tl.load(o_ptr + token[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=row_mask, other=0.0)
    # Delta in fp32 (bf16 arithmetic is not trusted; the conversion is exact). One row per tile
    # row: its reduction tree is the same for every row, whatever the neighbours hold.
    delta = tl.sum(d_out.to(tl.float32) * out.to(tl.float32), axis=1)
    delta = tl.where(row_valid, delta, 0.0)
    tl.store(delta_ptr + token * NUM_HEADS + head, delta, mask=row_valid)
    lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh, mask=row_valid, other=0.0)

    kv_head = head // GROUP
    table_row = block_table_ptr + seq.to(tl.int64) * stride_table
    last_pos = tl.minimum(m * BLOCK_Q + BLOCK_Q, ctx) - 1
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for n in range(0, last_pos // BLOCK_KEYS + 1):
        key_pos = n * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
        key_valid = key_pos <= last_pos
        k = _load_kv_tile(k_cache_ptr, table_row, key_pos, key_valid, kv_head, page_size,
                          stride_kb, stride_ks, stride_kh, offs_d, d_valid)
        v = _load_kv_tile(v_cache_ptr, table_row, key_pos, key_valid, kv_head, page_size,
                          stride_vb, stride_vs, stride_vh, offs_d, d_valid)
        visible = row_valid[:, None] & (key_pos[None, :] <= pos[:, None])
        scores = _dot(q, tl.trans(k)) * scale
        p = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
        dp = _dot(d_out, tl.trans(v))
        ds = p * (dp - delta[:, None])
        # One partial per key tile, added in tile order (the compiler may fold the add into the
        # dot's accumulator on GPU: the order stays the same).
        acc += _dot(ds.to(k.dtype), k)
    dq = acc * scale
    tl.store(dq_ptr + token[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_kernel(q_ptr, do_ptr, lse_ptr, delta_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr,
                 query_start_loc_ptr, seq_lens_ptr, tile_starts_ptr, dk_ptr, dv_ptr,
                 num_seqs, page_size, scale,
                 stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, stride_lh,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
                 stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                 NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KEYS: tl.constexpr):
    pid = tl.program_id(0)
    tile = pid // NUM_KV_HEADS
    kv_head = pid % NUM_KV_HEADS
    if tile >= tl.load(tile_starts_ptr + num_seqs):
        return  # the grid is an upper bound on the number of key tiles (no host sync)
    seq, q_start, q_len, ctx, n = _tile_sequence(tile, tile_starts_ptr, query_start_loc_ptr, seq_lens_ptr,
                                                 num_seqs)
    first_pos = ctx - q_len
    key_pos = n * BLOCK_KEYS + tl.arange(0, BLOCK_KEYS)
    key_valid = key_pos < ctx
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_SIZE
    table_row = block_table_ptr + seq.to(tl.int64) * stride_table
    k = _load_kv_tile(k_cache_ptr, table_row, key_pos, key_valid, kv_head, page_size,
                      stride_kb, stride_ks, stride_kh, offs_d, d_valid)
    v = _load_kv_tile(v_cache_ptr, table_row, key_pos, key_valid, kv_head, page_size,
                      stride_vb, stride_vs, stride_vh, offs_d, d_valid)

    dk_acc = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_KEYS, BLOCK_D), dtype=tl.float32)
    # Query tiles (absolute positions) that can see a key of this tile, ascending; inside each,
    # the query heads of this kv head, ascending. One flat loop so that loads pipeline.
    m_first = tl.maximum(first_pos, n * BLOCK_KEYS) // BLOCK_Q
    m_end = (ctx - 1) // BLOCK_Q + 1
    for step in range(0, (m_end - m_first) * GROUP):
        m = m_first + step // GROUP
        head = kv_head * GROUP + step % GROUP
        pos = m * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_valid = (pos >= first_pos) & (pos < ctx)
        token = (q_start + pos - first_pos).to(tl.int64)
        row_mask = row_valid[:, None] & d_valid[None, :]
        q = tl.load(q_ptr + token[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=row_mask,
                    other=0.0)
        d_out = tl.load(do_ptr + token[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=row_mask,
                        other=0.0)
        lse = tl.load(lse_ptr + token * stride_lt + head * stride_lh, mask=row_valid, other=0.0)
        delta = tl.load(delta_ptr + token * (NUM_KV_HEADS * GROUP) + head, mask=row_valid, other=0.0)
        # Transposed tiles [keys, queries]: each key's sums run over the queries.
        visible = row_valid[None, :] & (pos[None, :] >= key_pos[:, None])
        scores_t = _dot(k, tl.trans(q)) * scale
        p_t = tl.where(visible, tl.exp(scores_t - lse[None, :]), 0.0)
        dv_acc += _dot(p_t.to(d_out.dtype), d_out)
        dp_t = _dot(v, tl.trans(d_out))
        ds_t = p_t * (dp_t - delta[None, :])
        dk_acc += _dot(ds_t.to(q.dtype), q)

    block = tl.load(table_row + key_pos // page_size, mask=key_valid, other=0).to(tl.int64)
    slot = (key_pos % page_size).to(tl.int64)
    out_mask = key_valid[:, None] & d_valid[None, :]
    kv = kv_head.to(tl.int64)
    tl.store(dk_ptr + block[:, None] * stride_dkb + slot[:, None] * stride_dks + kv * stride_dkh + offs_d[None, :],
             (dk_acc * scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + block[:, None] * stride_dvb + slot[:, None] * stride_dvs + kv * stride_dvh + offs_d[None, :],
             dv_acc.to(dv_ptr.dtype.element_ty), mask=out_mask)


# ------------------------------------------------------------------------------------------
# Launch configurations: functions of (head size, dtype, arch) only, never of the token count.

class KernelConfig(NamedTuple):
    block_q: int       # query rows per tile
    block_keys: int    # keys per tile
    num_warps: int
    num_stages: int


class BwdConfig(NamedTuple):
    dq: KernelConfig    # a dQ program owns block_q queries and steps over keys block_keys at a time
    dkdv: KernelConfig  # a dK/dV program owns block_keys keys and steps over queries block_q at a time


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEAD_SIZE = 256

#: Interpreter: small tiles so that the test shapes (tens of tokens) span several tiles.
_INTERPRETER_CONFIG = BwdConfig(KernelConfig(16, 16, 4, 1), KernelConfig(16, 16, 4, 1))

#: GPU tiles per (16-bit or fp32, head block). Chosen for H100/H200 (sm_90, wgmma) from the
#: compiled kernels' register and shared-memory use: the largest tiles that compile without
#: register spills (also checked for sm_80 mma.sync: at most a few spilled bytes). The dQ program
#: keeps a tall query tile (each K/V tile it loads is used by more rows), the dK/dV program a tall
#: key tile (each Q/dO tile is used by more keys); the fp32 accumulators (dQ; dK and dV) bound the
#: tile area at a given head size. fp32 runs on the FMA units (IEEE dots), which need smaller tiles.
_GPU_CONFIGS = {
    (False, 64): BwdConfig(KernelConfig(128, 64, 8, 3), KernelConfig(64, 128, 8, 3)),
    (False, 128): BwdConfig(KernelConfig(128, 64, 8, 2), KernelConfig(32, 128, 8, 2)),
    (False, 256): BwdConfig(KernelConfig(64, 32, 8, 2), KernelConfig(32, 32, 8, 2)),
    (True, 64): BwdConfig(KernelConfig(32, 32, 4, 2), KernelConfig(16, 32, 4, 2)),
    (True, 128): BwdConfig(KernelConfig(32, 32, 4, 2), KernelConfig(16, 32, 4, 2)),
    (True, 256): BwdConfig(KernelConfig(16, 16, 4, 2), KernelConfig(16, 16, 4, 2)),
}


def bwd_config(head_block: int, dtype: torch.dtype, arch: str) -> BwdConfig:
    """The launch configuration for a head block (power of two, 16..256), dtype and arch."""
    if arch == "interpreter":
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[(dtype == torch.float32, max(64, head_block))]


# ------------------------------------------------------------------------------------------
# Launcher

def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype}"


def _check_inputs(grad_out, q, key_cache, value_cache, out, lse, query_start_loc, seq_lens, block_table, scale):
    tensors = dict(grad_out=grad_out, q=q, key_cache=key_cache, value_cache=value_cache, out=out, lse=lse,
                   query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"triton attention_backward: {name} must be a tensor, got {type(t).__name__}")
    if len({t.device for t in tensors.values()}) != 1:
        raise ValueError("triton attention_backward: tensors on different devices: "
                         + ", ".join(f"{n} {t.device}" for n, t in tensors.items()))
    if q.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(f"triton attention_backward: q must be [T, Hq, D] ({_describe(q)}) and key_cache "
                         f"[num_blocks, block_size, Hk, D] ({_describe(key_cache)})")
    if q.dtype not in _DTYPES:
        raise TypeError(f"triton attention_backward: q must be bfloat16, float16 or float32, got {_describe(q)}")
    for name in ("grad_out", "key_cache", "value_cache", "out"):
        if tensors[name].dtype != q.dtype:
            raise TypeError(f"triton attention_backward: {name} ({_describe(tensors[name])}) must have q's dtype "
                            f"({_describe(q)})")
    if grad_out.shape != q.shape or out.shape != q.shape or value_cache.shape != key_cache.shape:
        raise ValueError(f"triton attention_backward: grad_out {_describe(grad_out)} and out {_describe(out)} must "
                         f"match q {_describe(q)}; value_cache {_describe(value_cache)} must match key_cache "
                         f"{_describe(key_cache)}")
    T, Hq, D = q.shape
    Hk = key_cache.size(2)
    if key_cache.size(3) != D or Hk == 0 or Hq % Hk != 0 or key_cache.size(1) == 0:
        raise ValueError(f"triton attention_backward: q {_describe(q)} must be [T, Hq, D] with Hq a multiple of "
                         f"Hk and the cache's D (key_cache {_describe(key_cache)}, block_size > 0)")
    if not 0 < D <= MAX_HEAD_SIZE:
        raise ValueError(f"triton attention_backward: head size {D} is outside (0, {MAX_HEAD_SIZE}]")
    if lse.dtype != torch.float32 or lse.shape != (T, Hq):
        raise ValueError(f"triton attention_backward: lse must be float32 [{T}, {Hq}], got {_describe(lse)}")
    for name in ("grad_out", "q", "out", "key_cache", "value_cache"):
        t = tensors[name]
        if t.stride(-1) != 1:
            raise ValueError(f"triton attention_backward: {name} needs a contiguous last dim, got {_describe(t)} "
                             f"strides {t.stride()}")
    B = seq_lens.size(0) if seq_lens.dim() == 1 else -1
    for name, t, shape in (("query_start_loc", query_start_loc, (B + 1,)), ("seq_lens", seq_lens, (B,))):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape != shape or not t.is_contiguous():
            raise ValueError(f"triton attention_backward: {name} must be contiguous int32 {list(shape)}, got "
                             f"{_describe(t)}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.size(0) != B or (
            block_table.size(1) > 1 and block_table.stride(1) != 1):
        raise ValueError(f"triton attention_backward: block_table must be int32 [{B}, max_blocks] with contiguous "
                         f"rows, got {_describe(block_table)}")
    if not isinstance(scale, (float, int)) or not scale > 0:
        raise ValueError(f"triton attention_backward: scale must be a positive float, got {scale!r}")


def _check_metadata_values(T, num_blocks, page_size, query_start_loc, seq_lens, block_table):
    """The CPU backend's checks on the metadata values; run only for CPU tensors (on a GPU they
    would cost a device sync, and the forward pass has already used the same metadata)."""
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    if qsl[0] < 0 or qsl[-1] > T:
        raise ValueError(f"triton attention_backward: query_start_loc [{qsl[0]}, ..., {qsl[-1]}] does not fit q's "
                         f"{T} tokens")
    for b, ctx in enumerate(lens):
        q_len = qsl[b + 1] - qsl[b]
        if q_len < 0 or ctx < q_len:
            raise ValueError(f"triton attention_backward: sequence {b} has {q_len} queries and seq_lens {ctx}")
        if q_len == 0:
            continue
        blocks = -(-ctx // page_size)
        if blocks > block_table.size(1):
            raise ValueError(f"triton attention_backward: sequence {b} needs {blocks} blocks, block_table has "
                             f"{block_table.size(1)}")
        row = block_table[b, :blocks]
        if blocks and (int(row.min()) < 0 or int(row.max()) >= num_blocks):
            raise ValueError(f"triton attention_backward: block_table[{b}] has ids outside [0, {num_blocks})")


def attention_backward(grad_out, q, key_cache, value_cache, out, lse, query_start_loc, seq_lens, block_table,
                       scale):
    """Gradients of :func:`attention` w.r.t. q and both caches: ``(dq [T, Hq, D], dk_cache, dv_cache)``
    in q's dtype, contiguous, zero wherever no query reads (unused cache slots, tokens outside every
    sequence). ``lse`` is the forward's fp32 log-sum-exp of the scaled scores (attention_with_lse)."""
    _launch.check_device("attention_backward", grad_out, q, key_cache, value_cache, out, lse, query_start_loc,
                         seq_lens, block_table)
    _check_inputs(grad_out, q, key_cache, value_cache, out, lse, query_start_loc, seq_lens, block_table, scale)
    # Delta = rowsum(dO * O) reduces loaded tiles, in their load layout: dO and O get the kernel
    # variant of fresh tensors (_launch.canonical_layout; no copy when they are contiguous). q, K
    # and V only feed tl.dot (MMA operand layouts, whatever the load layout) and lse / Delta are
    # used elementwise, so their layouts cannot change a bit.
    grad_out, out = _launch.canonical_layout(grad_out), _launch.canonical_layout(out)
    T, Hq, D = q.shape
    num_blocks, page_size, Hk, _ = key_cache.shape
    dq = torch.zeros((T, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.zeros(key_cache.shape, dtype=q.dtype, device=q.device)
    dv = torch.zeros(value_cache.shape, dtype=q.dtype, device=q.device)
    B = seq_lens.size(0)
    if B == 0 or T == 0 or num_blocks == 0:
        return dq, dk, dv
    if q.device.type == "cpu":
        interpreter.require_exact_dot("attention_backward")
        # Host-side value checks only here: on CUDA they would sync (and break CUDA-graph capture).
        _check_metadata_values(T, num_blocks, page_size, query_start_loc, seq_lens, block_table)
    head_block = max(16, triton.next_power_of_2(D))
    cfg = bwd_config(head_block, q.dtype, _launch.arch_key(q.device))

    # Tiles per sequence (device-side, no sync): query tiles at absolute positions for dQ, key
    # tiles for dK/dV; sequences without queries get none (their gradients stay zero).
    ctx = seq_lens.long()
    q_len = (query_start_loc[1:] - query_start_loc[:-1]).long()
    has_queries = q_len > 0
    q_tiles = torch.where(has_queries, (ctx - 1).div(cfg.dq.block_q, rounding_mode="floor")
                          - (ctx - q_len).div(cfg.dq.block_q, rounding_mode="floor") + 1, 0)
    key_tiles = torch.where(has_queries, (ctx + cfg.dkdv.block_keys - 1).div(cfg.dkdv.block_keys,
                                                                              rounding_mode="floor"), 0)
    zero = torch.zeros(1, dtype=torch.long, device=q.device)
    q_tile_starts = torch.cat([zero, q_tiles.cumsum(0)]).to(torch.int32)
    key_tile_starts = torch.cat([zero, key_tiles.cumsum(0)]).to(torch.int32)
    # Upper bounds of the tile counts from shapes only: a sequence's query tiles are at most
    # ceil(q_len / BLOCK_Q) + 1; its keys fit its block table row, and (blocks not shared) all
    # sequences' keys fit the cache.
    max_q_tiles = triton.cdiv(T, cfg.dq.block_q) + 2 * B
    max_key_tiles = min(B * triton.cdiv(block_table.size(1) * page_size, cfg.dkdv.block_keys),
                        triton.cdiv(num_blocks * page_size, cfg.dkdv.block_keys) + B)
    delta = torch.empty((T, Hq), dtype=torch.float32, device=q.device)
    # fp fusion off, as in the forward kernel: scale * q.k is rounded before lse is subtracted
    # (the forward's scores), and no multiply-add is contracted at the compiler's choice.
    common = dict(HEAD_SIZE=D, BLOCK_D=head_block, GROUP=Hq // Hk, enable_fp_fusion=False)
    scale = float(scale)

    _dq_kernel[(max_q_tiles * Hq,)](
        q, grad_out, out, lse, key_cache, value_cache, block_table, query_start_loc, seq_lens, q_tile_starts,
        dq, delta, B, page_size, scale,
        q.stride(0), q.stride(1), grad_out.stride(0), grad_out.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), lse.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
        dq.stride(0), dq.stride(1),
        NUM_HEADS=Hq, BLOCK_Q=cfg.dq.block_q, BLOCK_KEYS=cfg.dq.block_keys, num_warps=cfg.dq.num_warps,
        num_stages=cfg.dq.num_stages, **common)
    if max_key_tiles > 0:
        _dkdv_kernel[(max_key_tiles * Hk,)](
            q, grad_out, lse, delta, key_cache, value_cache, block_table, query_start_loc, seq_lens,
            key_tile_starts, dk, dv, B, page_size, scale,
            q.stride(0), q.stride(1), grad_out.stride(0), grad_out.stride(1), lse.stride(0), lse.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_table.stride(0),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            NUM_KV_HEADS=Hk, BLOCK_Q=cfg.dkdv.block_q, BLOCK_KEYS=cfg.dkdv.block_keys,
            num_warps=cfg.dkdv.num_warps, num_stages=cfg.dkdv.num_stages, **common)
    return dq, dk, dv


KERNELS = {"attention_backward": attention_backward}
