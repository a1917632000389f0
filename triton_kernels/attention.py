"""Batch-invariant paged attention forward (causal, GQA, vLLM V1 metadata) in Triton.

Per (query token, head) at absolute position p the arithmetic is fixed by p alone (contract.py,
"Attention"): keys 0..p in tiles of ATTN_TILE_N *logical* keys, grouped in splits of ATTN_SPLIT
keys; per split an fp32 online softmax from (-inf, 0, 0); splits folded left to right; out =
round(ACC / L). The Triton backend's own fixed arithmetic inside that structure:

* scores  s = tl.dot(q, k^T) * scale   (tensor-core MMA with fp32 accumulation; fp32 inputs use
  IEEE fp32, never TF32), one fp32 multiply by fp32(scale);
* per tile m' = max(m, max_j s_j), a = (m == -inf ? 0 : exp(m - m')), p_j = exp(s_j - m'),
  l = l*a + tl.sum(p)  (tl.sum: a fixed tree given the fixed launch configuration),
  acc = tl.dot(P, V, acc*a) with **P rounded to the KV dtype** (bf16/fp16, as FlashAttention;
  fp32 stays fp32) -- the MMA sums the tile's 32 keys in its fixed order;
* split fold M' = max(M, m_s), e1 = (M == -inf ? 0 : exp(M - M')), e2 = exp(m_s - M'),
  L = L*e1 + l_s*e2, ACC = ACC*e1 + acc_s*e2; out = div_rn(ACC, L); lse = M + log(L).

Kernels are launched with fp fusion off, so no multiply-add is contracted differently in the two
kernels that fold splits. One launch configuration per (head size, dtype, arch): BLOCK_M rows
(query tokens x the GQA heads of one kv head) against TILE_N keys, so every row -- a decode token
or a prefill token -- goes through the same MMA instructions, and a row's result never depends on
the other rows of its tile (masked keys contribute exact zeros; rows with no key in a tile keep
their state untouched).

Two work splits give the same bits (same per-split states, same fold order):
* fused (prefill-heavy launches): a program owns (query tile, kv head) and folds its splits in
  registers, writing the output directly -- no workspace;
* split-parallel (few programs, long contexts: decode): programs also own splits, write fp32
  partial states to a workspace, and a second kernel folds them in order per (token, head).
The choice depends on the launch shape only and never changes a bit (the tests check this).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..contract import ATTN_SPLIT, ATTN_TILE_N
from . import _launch, interpreter

#: Rows (query tokens x GQA heads) of one program's tile: fixed, never chosen by the batch.
BLOCK_M = 64
MAX_HEAD_SIZE = 256
#: Split-parallel mode is used when the fused grid has fewer programs than this many per SM, and
#: its workspace stays under the budget (both only pick the work split, never the arithmetic).
_SPLIT_MODE_PROGRAMS_PER_SM = 4
_SPLIT_MODE_TARGET_PER_SM = 8
_WORKSPACE_BUDGET_BYTES = 256 << 20


@triton.jit
def _last_at_or_before(starts_ptr, num_seqs, target, DIVISOR: tl.constexpr, ADD_INDEX: tl.constexpr):
    """Largest b in [0, num_seqs) with key(b) <= target (0 if none); key(b) = starts[b] // DIVISOR
    (+ b with ADD_INDEX), nondecreasing in b. Counted over whole chunks of the (tiny, L2-resident)
    array: independent loads, so a program pays one memory round trip, not log2(B) dependent ones;
    and the grid needs no host-side sync."""
    CHUNK: tl.constexpr = 128
    count = 0
    for first in range(0, num_seqs, CHUNK):
        idx = first + tl.arange(0, CHUNK)
        key = tl.load(starts_ptr + idx, mask=idx < num_seqs, other=0)
        if ADD_INDEX:
            key = key // DIVISOR + idx
        count += tl.sum(((key <= target) & (idx < num_seqs)).to(tl.int32), 0)
    return tl.maximum(count - 1, 0)


@triton.jit
def _fold_split(M, L, ACC, m_s, l_s, acc_s):
    """The contract's split combine (shared by both work splits so they cannot drift apart)."""
    M_new = tl.maximum(M, m_s)
    e_run = tl.where(M == float("-inf"), 0.0, tl.exp(M - M_new))
    e_split = tl.exp(m_s - M_new)
    L = L * e_run + l_s * e_split
    ACC = ACC * e_run[:, None] + acc_s * e_split[:, None]
    return M_new, L, ACC


@triton.jit
def _attend_tile(q, m, l, acc, tile, pos, ctx, table_row_ptr, block_size, k_ptr, v_ptr, k_sb, k_ss, v_sb, v_ss,
                 k_head_off, v_head_off, scale, offs_d,
                 HEAD_SIZE: tl.constexpr, TILE_N: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step of every row against logical keys [tile*TILE_N, (tile+1)*TILE_N).

    MASKED=False is the fast path for tiles every row sees entirely (keys <= min position); it
    performs exactly the operations the masked path performs for such rows."""
    keys = tile * TILE_N + tl.arange(0, TILE_N)
    d_ok = offs_d < HEAD_SIZE
    if MASKED:
        in_ctx = keys < ctx  # keys past the sequence: never read (block table or cache)
        blocks = tl.load(table_row_ptr + keys // block_size, mask=in_ctx, other=0).to(tl.int64)
        k_mask = in_ctx[None, :] & d_ok[:, None]
        v_mask = in_ctx[:, None] & d_ok[None, :]
    else:
        blocks = tl.load(table_row_ptr + keys // block_size).to(tl.int64)
        k_mask = d_ok[:, None]
        v_mask = d_ok[None, :]
    slots = (keys % block_size).to(tl.int64)
    k_rows = blocks * k_sb + slots * k_ss + k_head_off
    v_rows = blocks * v_sb + slots * v_ss + v_head_off
    k_t = tl.load(k_ptr + k_rows[None, :] + offs_d[:, None], mask=k_mask, other=0.0)
    scores = tl.dot(q, k_t, input_precision="ieee") * scale  # [BLOCK_M, TILE_N] fp32
    if MASKED:
        visible = keys[None, :] <= pos[:, None]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new))
    probs = tl.exp(scores - m_new[:, None])
    if MASKED:
        probs = tl.where(visible, probs, 0.0)  # also kills exp(-inf - -inf) = NaN of key-less rows
    l = l * alpha + tl.sum(probs, 1)
    v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
    acc_new = tl.dot(probs.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    if MASKED:
        # A row with no key in this tile keeps acc untouched (not even +-0 products added), so it
        # ends bitwise as it would have without this tile (decode never visits it).
        acc_new = tl.where((pos >= tile * TILE_N)[:, None], acc_new, acc)
    return m_new, l, acc_new


@triton.jit
def _split_state(q, pos, pos_min, ctx, split, num_tiles, table_row_ptr, block_size, k_ptr, v_ptr,
                 k_sb, k_ss, v_sb, v_ss, k_head_off, v_head_off, scale, offs_d,
                 HEAD_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
                 TILE_N: tl.constexpr, SPLIT: tl.constexpr):
    """(m, l, acc) of every row over the keys of one split, from (-inf, 0, 0)."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    tile_lo = split * (SPLIT // TILE_N)
    tile_hi = tl.minimum(tile_lo + SPLIT // TILE_N, num_tiles)
    # tiles below (pos_min + 1) // TILE_N hold only keys that every row of the tile sees
    tile_mid = tl.maximum(tl.minimum((pos_min + 1) // TILE_N, tile_hi), tile_lo)
    for tile in range(tile_lo, tile_mid):
        m, l, acc = _attend_tile(q, m, l, acc, tile, pos, ctx, table_row_ptr, block_size, k_ptr, v_ptr, k_sb, k_ss,
                                 v_sb, v_ss, k_head_off, v_head_off, scale, offs_d, HEAD_SIZE, TILE_N, False)
    for tile in range(tile_mid, tile_hi):
        m, l, acc = _attend_tile(q, m, l, acc, tile, pos, ctx, table_row_ptr, block_size, k_ptr, v_ptr, k_sb, k_ss,
                                 v_sb, v_ss, k_head_off, v_head_off, scale, offs_d, HEAD_SIZE, TILE_N, True)
    return m, l, acc


# Batch-dependent integers are not value-specialised (Triton would otherwise compile other
# variants for, e.g., a single sequence or block size 1): one compiled kernel per model config.
_BATCH_INTS = ["num_seqs", "block_size", "table_stride", "group", "head_chunks", "ws_splits", "num_heads"]


@triton.jit(do_not_specialize=_BATCH_INTS)
def _paged_attention_kernel(
        q_ptr, q_st, q_sh, k_ptr, k_sb, k_ss, k_sh, v_ptr, v_sb, v_ss, v_sh,
        query_start_ptr, seq_lens_ptr, table_ptr, table_stride, num_seqs, block_size, group, head_chunks,
        scale, out_ptr, out_st, out_sh, lse_ptr, ws_acc_ptr, ws_m_ptr, ws_l_ptr, ws_splits, num_heads,
        HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HEADS: tl.constexpr,
        TILE_N: tl.constexpr, SPLIT: tl.constexpr, SPLIT_PARALLEL: tl.constexpr, WITH_LSE: tl.constexpr):
    """Program (query tile, kv head x head chunk, split program). Rows r = token * HEADS + head."""
    BLOCK_Q: tl.constexpr = BLOCK_M // HEADS
    pid_q = tl.program_id(0)
    kv_head = tl.program_id(1) // head_chunks
    head_chunk = tl.program_id(1) % head_chunks
    seq = _last_at_or_before(query_start_ptr, num_seqs, pid_q, BLOCK_Q, True)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    q_first = (pid_q - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query (within the chunk) of this tile
    if q_first < 0 or q_first >= q_len:
        return  # a spare program of the grid bound (or a token before query_start_loc[0])
    ctx = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    q_idx = q_first + rows // HEADS
    head_in_group = head_chunk * HEADS + rows % HEADS
    valid = (rows < BLOCK_Q * HEADS) & (q_idx < q_len) & (head_in_group < group)
    pos = tl.where(valid, ctx - q_len + q_idx, -1)  # absolute position; -1: no keys at all
    pos_min = ctx - q_len + q_first
    pos_max = ctx - q_len + tl.minimum(q_first + BLOCK_Q, q_len) - 1
    num_tiles = pos_max // TILE_N + 1
    tokens = (q_start + q_idx).to(tl.int64)
    heads = (kv_head * group + head_in_group).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_SIZE
    q = tl.load(q_ptr + (tokens * q_st + heads * q_sh)[:, None] + offs_d[None, :],
                mask=valid[:, None] & d_ok[None, :], other=0.0)
    table_row_ptr = table_ptr + seq.to(tl.int64) * table_stride
    k_head_off = kv_head.to(tl.int64) * k_sh
    v_head_off = kv_head.to(tl.int64) * v_sh
    num_splits = pos_max // SPLIT + 1
    if SPLIT_PARALLEL:
        # one split at a time (strided over the split programs); partial states to the workspace
        ws_row = (tokens * num_heads + heads) * ws_splits
        for split in range(tl.program_id(2), num_splits, tl.num_programs(2)):
            m, l, acc = _split_state(q, pos, pos_min, ctx, split, num_tiles, table_row_ptr, block_size, k_ptr, v_ptr,
                                     k_sb, k_ss, v_sb, v_ss, k_head_off, v_head_off, scale, offs_d,
                                     HEAD_SIZE, BLOCK_M, D_PAD, TILE_N, SPLIT)
            has_keys = pos >= split * SPLIT  # only splits holding keys <= pos exist for a row
            tl.store(ws_m_ptr + ws_row + split, m, mask=has_keys)
            tl.store(ws_l_ptr + ws_row + split, l, mask=has_keys)
            tl.store(ws_acc_ptr + (ws_row + split)[:, None] * D_PAD + offs_d[None, :], acc, mask=has_keys[:, None])
    else:
        M = tl.full([BLOCK_M], float("-inf"), tl.float32)
        L = tl.zeros([BLOCK_M], tl.float32)
        ACC = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        for split in range(0, num_splits):
            m, l, acc = _split_state(q, pos, pos_min, ctx, split, num_tiles, table_row_ptr, block_size, k_ptr, v_ptr,
                                     k_sb, k_ss, v_sb, v_ss, k_head_off, v_head_off, scale, offs_d,
                                     HEAD_SIZE, BLOCK_M, D_PAD, TILE_N, SPLIT)
            M_new, L_new, ACC_new = _fold_split(M, L, ACC, m, l, acc)
            has_keys = pos >= split * SPLIT
            M = tl.where(has_keys, M_new, M)
            L = tl.where(has_keys, L_new, L)
            ACC = tl.where(has_keys[:, None], ACC_new, ACC)
        out = tl.math.div_rn(ACC, L[:, None])
        tl.store(out_ptr + (tokens * out_st + heads * out_sh)[:, None] + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=valid[:, None] & d_ok[None, :])
        if WITH_LSE:
            tl.store(lse_ptr + tokens * num_heads + heads, M + tl.log(L), mask=valid)


@triton.jit(do_not_specialize=["ws_splits", "num_seqs", "num_heads"])
def _combine_splits_kernel(ws_acc_ptr, ws_m_ptr, ws_l_ptr, ws_splits, query_start_ptr, seq_lens_ptr, num_seqs,
                           num_heads, out_ptr, out_st, out_sh, lse_ptr,
                           HEAD_SIZE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                           SPLIT: tl.constexpr, WITH_LSE: tl.constexpr):
    """Program (token, head block): fold splits 0..pos // SPLIT in order, write out (and lse)."""
    token = tl.program_id(0)
    if token < tl.load(query_start_ptr) or token >= tl.load(query_start_ptr + num_seqs):
        return  # padding token: its output stays 0
    seq = _last_at_or_before(query_start_ptr, num_seqs, token, 1, False)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    pos = tl.load(seq_lens_ptr + seq) - q_len + (token - q_start)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    offs_d = tl.arange(0, D_PAD)
    ws_row = (token.to(tl.int64) * num_heads + heads) * ws_splits
    M = tl.full([BLOCK_H], float("-inf"), tl.float32)
    L = tl.zeros([BLOCK_H], tl.float32)
    ACC = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    for split in tl.range(0, pos // SPLIT + 1, num_stages=4):
        m_s = tl.load(ws_m_ptr + ws_row + split, mask=h_ok, other=0.0)
        l_s = tl.load(ws_l_ptr + ws_row + split, mask=h_ok, other=0.0)
        acc_s = tl.load(ws_acc_ptr + (ws_row + split)[:, None] * D_PAD + offs_d[None, :], mask=h_ok[:, None],
                        other=0.0)
        M, L, ACC = _fold_split(M, L, ACC, m_s, l_s, acc_s)
    out = tl.math.div_rn(ACC, L[:, None])
    out_rows = token.to(tl.int64) * out_st + heads.to(tl.int64) * out_sh
    tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_ok[:, None] & (offs_d < HEAD_SIZE)[None, :])
    if WITH_LSE:
        tl.store(lse_ptr + token.to(tl.int64) * num_heads + heads, M + tl.log(L), mask=h_ok)


# ------------------------------------------------------------------------------------------------
# Launchers


def _config(head_size: int, dtype: torch.dtype, arch: str) -> dict:
    """Launch configuration: a function of the head size, dtype and device only. Warps sized so
    the two fp32 accumulators (split state + fold) fit in registers (sm_90 ptxas: no spills up to
    D=128; fp32 runs the IEEE dot on FMA units and needs more warps)."""
    d_pad = max(16, triton.next_power_of_2(head_size))  # tl.dot needs K >= 16
    if dtype == torch.float32:
        warps = 8 if d_pad <= 64 else 16
    else:
        warps = 4 if d_pad <= 64 else 8
    return {"D_PAD": d_pad, "num_warps": warps, "num_stages": 3 if d_pad <= 128 else 2,
            "combine_heads": min(16, max(1, 1024 // d_pad)) if arch == "interpreter" else 1}


def _check_metadata_on_cpu(q, key_cache, query_start_loc, seq_lens, block_table) -> None:
    """The CPU extension's metadata checks, where they cost no device sync (interpreter runs).
    On CUDA the engine's metadata is trusted (checking would stall every launch)."""
    qsl, lens, table = query_start_loc.tolist(), seq_lens.tolist(), block_table
    num_blocks, block_size = key_cache.size(0), key_cache.size(1)
    if qsl[0] < 0 or qsl[-1] > q.size(0):
        raise ValueError(f"attention: query_start_loc {qsl} does not fit q's {q.size(0)} tokens")
    for b, ctx in enumerate(lens):
        q_len = qsl[b + 1] - qsl[b]
        if q_len < 0:
            raise ValueError(f"attention: query_start_loc must be nondecreasing (sequence {b}: {qsl})")
        if ctx < q_len:
            raise ValueError(f"attention: seq_lens[{b}] = {ctx} < query length {q_len}")
        if q_len == 0:
            continue
        need = -(-ctx // block_size)
        if need > table.size(1):
            raise ValueError(f"attention: sequence {b} needs {need} blocks, block_table has {table.size(1)}")
        ids = table[b, :need]
        if need and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
            raise ValueError(f"attention: block_table[{b}, :{need}] has ids outside [0, {num_blocks})")


def _forward(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale, with_lse, *,
             split=ATTN_SPLIT, split_parallel=None):
    _launch.check_device("attention", q, key_cache, value_cache, query_start_loc, seq_lens, block_table)
    if q.dtype not in _launch.TL_DTYPES or key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        raise TypeError(f"attention: q {q.dtype}, key_cache {key_cache.dtype}, value_cache {value_cache.dtype}: "
                        "need one dtype among bfloat16/float16/float32")
    num_tokens, num_heads, head_size = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if head_size > MAX_HEAD_SIZE:
        raise ValueError(f"attention: head size {head_size} (q {tuple(q.shape)}) > {MAX_HEAD_SIZE} is not supported "
                         "by the triton backend")
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name} {tuple(t.shape)} needs a contiguous last dim, strides {t.stride()}")
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_table", block_table)):
        if t.dtype != torch.int32:
            raise TypeError(f"attention: {name} must be int32, got {t.dtype}")
    if split % ATTN_TILE_N or split <= 0:
        raise ValueError(f"attention: split {split} must be a positive multiple of {ATTN_TILE_N}")
    out = torch.zeros((num_tokens, num_heads, head_size), dtype=q.dtype, device=q.device)
    lse = torch.zeros((num_tokens, num_heads), dtype=torch.float32, device=q.device) if with_lse else None
    num_seqs = seq_lens.numel()
    capacity = block_table.size(1) * block_size  # >= every seq_len: bounds the splits without a sync
    if num_tokens == 0 or num_seqs == 0 or num_heads == 0 or capacity == 0:
        return out, lse
    if q.device.type == "cpu":
        interpreter.require_exact_dot("attention")
        # Host-side value checks only here: on CUDA they would sync (and break CUDA-graph capture).
        _check_metadata_on_cpu(q, key_cache, query_start_loc, seq_lens, block_table)
    # No _launch.canonical_layout: the kernels' float reductions (row max / sum of the scores) run
    # on tl.dot outputs, in the MMA accumulator layout, which does not follow the loads' vector
    # width; the split fold is elementwise and _last_at_or_before's integer counts are exact.

    arch = _launch.arch_key(q.device)
    cfg = _config(head_size, q.dtype, arch)
    group = num_heads // num_kv_heads
    heads_per_tile = min(group, BLOCK_M)
    head_chunks = -(-group // heads_per_tile)
    block_q = BLOCK_M // heads_per_tile
    q_tiles = num_tokens // block_q + num_seqs  # >= sum of every sequence's query tiles
    base_programs = q_tiles * num_kv_heads * head_chunks
    ws_splits = -(-capacity // split)
    ws_bytes = num_tokens * num_heads * ws_splits * (cfg["D_PAD"] + 2) * 4
    # One SM under the interpreter keeps its launches small; the work split never changes the bits.
    sms = _launch.sm_count(q.device, interpreter=1)
    if split_parallel is None:
        split_parallel = (ws_splits > 1 and base_programs < _SPLIT_MODE_PROGRAMS_PER_SM * sms
                          and ws_bytes <= _WORKSPACE_BUDGET_BYTES)
    split_programs = min(ws_splits, -(-_SPLIT_MODE_TARGET_PER_SM * sms // base_programs)) if split_parallel else 1
    if split_parallel:
        ws_acc = torch.empty(num_tokens * num_heads * ws_splits * cfg["D_PAD"], dtype=torch.float32, device=q.device)
        ws_m = torch.empty(num_tokens * num_heads * ws_splits, dtype=torch.float32, device=q.device)
        ws_l = torch.empty_like(ws_m)
    else:
        ws_acc = ws_m = ws_l = out  # unused
    lse_arg = lse if with_lse else out
    _paged_attention_kernel[(q_tiles, num_kv_heads * head_chunks, split_programs)](
        q, q.stride(0), q.stride(1), key_cache, key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache, value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        query_start_loc, seq_lens, block_table, block_table.stride(0), num_seqs, block_size, group, head_chunks,
        float(scale), out, out.stride(0), out.stride(1), lse_arg, ws_acc, ws_m, ws_l, ws_splits, num_heads,
        HEAD_SIZE=head_size, D_PAD=cfg["D_PAD"], BLOCK_M=BLOCK_M, HEADS=heads_per_tile, TILE_N=ATTN_TILE_N,
        SPLIT=split, SPLIT_PARALLEL=split_parallel, WITH_LSE=with_lse,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False)
    if split_parallel:
        block_h = min(cfg["combine_heads"], triton.next_power_of_2(num_heads))
        _combine_splits_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            ws_acc, ws_m, ws_l, ws_splits, query_start_loc, seq_lens, num_seqs, num_heads,
            out, out.stride(0), out.stride(1), lse_arg,
            HEAD_SIZE=head_size, D_PAD=cfg["D_PAD"], BLOCK_H=block_h, SPLIT=split, WITH_LSE=with_lse,
            num_warps=1 if cfg["D_PAD"] <= 128 else 2, enable_fp_fusion=False)
    return out, lse


def attention(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale, *, _split=ATTN_SPLIT,
              _split_parallel=None):
    """out [T, Hq, D] (q's dtype); rows of padding tokens are 0. Test-only keywords: ``_split``
    (a non-contract split size, for the negative control) and ``_split_parallel`` (force a work
    split; None = chosen from the launch shape)."""
    return _forward(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale, False,
                    split=_split, split_parallel=_split_parallel)[0]


def attention_with_lse(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale, *,
                       _split=ATTN_SPLIT, _split_parallel=None):
    """(out, lse fp32 [T, Hq]) with lse = M + log(L) of the scaled scores (0 for padding tokens)."""
    return _forward(q, key_cache, value_cache, query_start_loc, seq_lens, block_table, scale, True,
                    split=_split, split_parallel=_split_parallel)


KERNELS = {"attention": attention, "attention_with_lse": attention_with_lse}
