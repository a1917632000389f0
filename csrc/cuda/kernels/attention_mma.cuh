// CUDA batch-invariant paged attention forward, tensor-core version (mma.sync m16n8k16): the one
// path of bf16 / fp16 with head size D in {64, 128} (attention_mma_head(D); a function of D only:
// other head sizes and fp32 run the SIMT kernels of attention.cuh, fp32 in IEEE, never TF32).
// Torch-free; launched through attention_plan.cuh by csrc/cuda/launch_attention.cu and the
// simulator csrc/cuda/sim/sim_attention.cpp.
//
// Work split: a block = one kv head g x one query tile of kAttnMmaRows = 64 rows, the rows being
// (token, q head of g's GQA group) pairs of ONE sequence (as the Triton kernel,
// triton_kernels/attention.py): heads_per_tile = min(group, 64), block_q = 64 / heads_per_tile
// tokens, row r = token (q_first + r / heads_per_tile), head (chunk * heads_per_tile +
// r % heads_per_tile); a group larger than 64 takes ceil(group / 64) head chunks. Grid: x = query
// tiles (q_tiles = T / block_q + B: sequence b's tiles start at qsl[b] / block_q + b; a block finds
// its sequence by a binary search of that nondecreasing key, spare blocks return), y = Hk * chunks,
// z = splits (split-parallel path) or 1: functions of the shapes only, no host sync. 4 warps x 16
// rows; rows beyond the sequence / group are empty (Q = 0, no keys, never written).
//
// Per row at absolute position p (exactly the contract's structure, contract.py "Attention"):
//   * keys 0..p in tiles of ATTN_TILE_N = 32 logical keys (tile t = keys [32t, 32t + 32)), pages
//     looked up through the block table when a tile is staged; splits of `split` = ATTN_SPLIT keys;
//     per split a state (m, l, acc[D]) from (-inf, 0, +0).
//   * S = Q K^T on the tensor cores: fp32 accumulators from +0, k16 steps over d ascending (the
//     per-element order of mma.sync; which other rows / keys share the MMA changes nothing);
//     s = mul_rn(S, scale); keys > p (and keys past the tile's last position, zero-filled in shared
//     memory) are masked: s = -inf, p_j = +0 (selected, never computed from -inf).
//   * tile max: each lane folds its 8 scores of the row (keys 8j + 2c + e, j = 0..3, e = 0..1,
//     c = lane % 4: ascending key order) with max_sym from -inf, then the quad's xor shuffles 1, 2
//     (max_sym: the larger; for equal values the AND of the bits, so +0 wins over -0 whatever the
//     operand order: every lane of the quad gets the same bits). m' = (mt > m ? mt : m).
//   * a = (m == -inf) ? 0 : exp_f32(m - m');  p_j = exp_f32(s_j - m') (exp_f32 of row_common.cuh).
//   * row sum: each lane adds its 8 p_j in the same ascending order from +0 (add_rn), then the
//     quad's xor shuffles 1, 2 (add_rn, commutative: one value per quad); l = add_rn(mul_rn(l, a), sum).
//   * P V on the tensor cores with P ROUNDED TO T (bf16 / fp16, round to nearest even), as
//     FlashAttention and our Triton kernel do: pv = sum over the tile's two k16 key steps (ascending)
//     from +0 in fp32; acc = add_rn(mul_rn(acc, a), pv) per element. (The tile's P V is formed from
//     +0 and added with one add_rn - not accumulated onto acc inside the MMA - so that a row without
//     keys in the tile keeps its state by selection, bit for bit, whatever the tensor core does
//     with zero products.)
//   * a row with no key in a tile (p < 32t: prefill tiles reach the tile's last position) leaves
//     (m, l, acc) untouched; a row without keys in a split does not fold it (decode never visits
//     either): the row's operation sequence is a function of p, D and the dtype only.
//   * splits folded left to right into (M, L, ACC) from (-inf, 0, +0) with attention.cuh's
//     split_fold_factors / split_fold_value (the SIMT kernels' combine_split); out = round_to_T(
//     div_rn(ACC, L)); lse = add_rn(M, log_f32(L)). Sequential kernel: in the block, split after
//     split. Split-parallel kernel: one block per (tile, kv head, split) writes (m, l, acc) per row to
//     the fp32 workspace of attention.cuh (Workspace layout), and attention_combine_kernel (the
//     SIMT one: elementwise, layout-independent) folds them with the same function: the same bits.
// Padding tokens (outside [qsl[0], qsl[B])) belong to no tile: the sequential path zero-fills out
// and lse before the launch (attention_plan.cuh), the split path's combine kernel writes them +0.
// Bits: the tensor core's k16 accumulation is not IEEE-specified (the simulator's mma is a
// fixed-order binary64 routine: it checks the logic, not the last bit of a k16 step), so device
// and simulator bits may differ; within one device the order is fixed and batch-independent.
//
// Staging: per key tile, K[32][D] by 16-byte cp.async where every K and V row start is 16-byte
// aligned (kv_vec), else element loads; V transposed into Vt[D][32] (the B operand of P V through
// ldmatrix without .trans) by 16-byte loads (kv_vec) or element loads, and 2-byte shared stores;
// Q[64][D] once per block. Dynamic shared memory attention_mma_smem_bytes<T>(D, fold): 36 KiB at
// D = 128 for the split kernel; the sequential kernel keeps its fold's ACC there too (+32 KiB:
// 68 KiB, opted in by the launcher), which keeps it within the register file without spills
// (~220 registers per thread at D = 128, ~140 at D = 64; nvcc checks in tests/cuda).
// Performance (honest, not yet measured on a GPU): one K/V stage (no double buffering: the loads
// of a tile are not overlapped with the MMAs of the previous one), V transposed with 2-byte
// stores, ~2 blocks per SM at D = 128 (registers), decode tiles mostly empty rows (1 token x group
// heads of 64 rows: the warps without rows skip the MMAs but still stage); in exchange tensor
// cores for Q K^T and P V, and one K / V read per (tile, kv head) instead of one per q head.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention.cuh"

namespace bi {
namespace cuda {

constexpr int kAttnMmaRows = 64;
constexpr int kAttnMmaWarps = kAttnMmaRows / 16;
constexpr int kAttnMmaThreads = kAttnMmaWarps * kWarp;
static_assert(kAttnTile == 32, "the tensor-core attention kernel holds a tile as 4 n8 fragments");

// Head sizes of the tensor-core kernels (a function of D only).
inline bool attention_mma_head(int64_t D) { return D == 64 || D == 128; }

template <int D>
struct AttnMmaLayout {
  static constexpr int LDQ = D + 8, LDK = D + 8, LDV = kAttnTile + 8;  // 16-byte rows, padded
  static constexpr int Q = kAttnMmaRows * LDQ, K = kAttnTile * LDK, V = D * LDV;  // elements of T
  static constexpr int ACC = kAttnMmaRows * D;  // floats: the sequential kernel's fold ACC
  template <typename T>
  static constexpr size_t bytes(bool fold) {
    return size_t(Q + K + V) * sizeof(T) + (fold ? size_t(ACC) * sizeof(float) : 0);
  }
};
// Dynamic shared memory of the sequential (fold = true) or split kernel.
template <typename T>
inline size_t attention_mma_smem_bytes(int D, bool fold) {
  return D == 64 ? AttnMmaLayout<64>::bytes<T>(fold) : AttnMmaLayout<128>::bytes<T>(fold);
}

template <typename F>
void dispatch_attention_mma_head(int D, F&& f) {
  switch (D) {
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: throw std::invalid_argument("bi::cuda::dispatch_attention_mma_head: D " + std::to_string(D));
  }
}

namespace attn_mma_detail {

using attn_detail::neg_inf;
using attn_detail::SplitFold;
using attn_detail::split_fold_factors;
using attn_detail::split_fold_value;

// The block's query tile.
struct QTile {
  int b, q_first, q_len, ctx, g, group, hpt, bq, chunk;
  int64_t q0;         // token index of the sequence's first query
  int pos_max;        // position of the tile's last token
  const int32_t* bt;  // the sequence's block-table row
};

// Finds blockIdx.x's tile: the largest b with key(b) = qsl[b] / bq + b <= blockIdx.x; false for a
// spare block (block-uniform).
template <typename T>
BI_DEV bool find_tile(const AttentionArgs<T>& a, QTile& tl) {
  tl.group = a.Hq / a.Hk;
  tl.hpt = tl.group < kAttnMmaRows ? tl.group : kAttnMmaRows;
  const int chunks = (tl.group + tl.hpt - 1) / tl.hpt;
  tl.bq = kAttnMmaRows / tl.hpt;
  tl.g = int(blockIdx.y) / chunks;
  tl.chunk = int(blockIdx.y) % chunks;
  const int64_t pid = blockIdx.x;
  if (a.B <= 0 || int64_t(a.qsl[0]) / tl.bq > pid) return false;
  int lo = 0, hi = a.B - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (int64_t(a.qsl[mid]) / tl.bq + mid <= pid) lo = mid;
    else hi = mid - 1;
  }
  tl.b = lo;
  tl.q0 = a.qsl[lo];
  tl.q_len = a.qsl[lo + 1] - a.qsl[lo];
  const int64_t qf = (pid - (tl.q0 / tl.bq + lo)) * tl.bq;
  if (qf < 0 || qf >= tl.q_len) return false;
  tl.q_first = int(qf);
  tl.ctx = a.seq_lens[lo];
  const int last = tl.q_first + tl.bq < tl.q_len ? tl.q_first + tl.bq - 1 : tl.q_len - 1;
  tl.pos_max = tl.ctx - tl.q_len + last;
  tl.bt = a.bt + int64_t(lo) * a.bt_s;
  return true;
}

// Row r of the tile: position p (-1: no row), token, q head.
struct TileRow {
  int p, h;
  int64_t tok;
};
BI_DEV TileRow tile_row(const QTile& tl, int r) {
  const int i = tl.q_first + r / tl.hpt, hig = tl.chunk * tl.hpt + r % tl.hpt;
  TileRow row{-1, 0, 0};
  if (r >= tl.bq * tl.hpt || i >= tl.q_len || hig >= tl.group) return row;
  row.p = tl.ctx - tl.q_len + i;
  row.h = tl.g * tl.group + hig;
  row.tok = tl.q0 + i;
  return row;
}

// The larger of x, y; for equal values the AND of the bits (+0 over -0): symmetric in x, y.
BI_DEV float max_sym(float x, float y) {
  if (x > y) return x;
  if (y > x) return y;
  return uint_as_float(float_as_uint(x) & float_as_uint(y));
}

template <typename T>
BI_DEV uint32_t pack2(float lo, float hi) {
  const T a = from_f32<T>(lo), b = from_f32<T>(hi);
  uint16_t ua, ub;
  std::memcpy(&ua, &a, 2);
  std::memcpy(&ub, &b, 2);
  return uint32_t(ua) | (uint32_t(ub) << 16);
}

// Q rows of the tile into sQ (empty rows: zeros); one warp per row, lanes over d.
template <typename T, int D>
BI_DEV void stage_q(const AttentionArgs<T>& a, const QTile& tl, T* sQ) {
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const T zero = from_f32<T>(0.0f);
  for (int r = warp; r < kAttnMmaRows; r += kAttnMmaWarps) {
    const TileRow row = tile_row(tl, r);
    const T* src = a.q + row.tok * a.q_st + int64_t(row.h) * a.q_sh;
    for (int d = lane; d < D; d += kWarp) sQ[r * AttnMmaLayout<D>::LDQ + d] = row.p >= 0 ? src[d] : zero;
  }
}

// Key tile t (keys [32t, 32t + 32)) into sK [key][d] and sVt [d][key]; keys past the tile's last
// position: zeros (never read from the cache). K: a key row per CPR consecutive threads (coalesced),
// 16-byte cp.async when kv_vec; V: consecutive threads take consecutive keys of one 8-column chunk,
// so the transposed 2-byte stores of a warp hit distinct banks; one 16-byte load when kv_vec.
// Committed as one cp.async group. The loads move data only.
template <typename T, int D>
BI_DEV void stage_kv(const AttentionArgs<T>& a, const QTile& tl, int t, T* sK, T* sVt) {
  using L = AttnMmaLayout<D>;
  constexpr int CPR = D / 8;  // 8-element chunks per key row
  const T zero = from_f32<T>(0.0f);
  for (int c = int(threadIdx.x); c < kAttnTile * CPR; c += kAttnMmaThreads) {
    const int j = c / CPR, d0 = (c % CPR) * 8;
    const int pos = t * kAttnTile + j;
    const bool ok = pos <= tl.pos_max;
    int64_t blk = 0;
    int off = 0;
    if (ok) {
      blk = tl.bt[pos / a.block_size];
      off = pos % a.block_size;
    }
    const T* ks = a.kc + blk * a.kc_sb + int64_t(off) * a.kc_ss + int64_t(tl.g) * a.kc_sh + d0;
    T* kd = sK + j * L::LDK + d0;
    if (a.kv_vec) {
      cp_async_16(kd, ok ? ks : a.kc, ok ? 16 : 0);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) kd[i] = ok ? ks[i] : zero;
    }
  }
  cp_async_commit();
  for (int c = int(threadIdx.x); c < kAttnTile * CPR; c += kAttnMmaThreads) {
    const int j = c % kAttnTile, d0 = (c / kAttnTile) * 8;
    const int pos = t * kAttnTile + j;
    T v[8];
    if (pos <= tl.pos_max) {
      const int64_t blk = tl.bt[pos / a.block_size];
      const int off = pos % a.block_size;
      const T* vs = a.vc + blk * a.vc_sb + int64_t(off) * a.vc_ss + int64_t(tl.g) * a.vc_sh + d0;
      if (a.kv_vec) {
        const uint4 raw = *reinterpret_cast<const uint4*>(vs);
        std::memcpy(v, &raw, sizeof(raw));
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = vs[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = zero;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sVt[(d0 + i) * L::LDV + j] = v[i];
  }
}

// A thread's share of the online softmax state of its warp's 16 rows: rows g = lane / 4 (index 0)
// and g + 8 (index 1); acc[n8 block jd][e]: row (e < 2 ? g : g + 8), d = 8 jd + 2 (lane % 4) + e % 2.
template <int D>
struct MmaState {
  float m[2], l[2], acc[D / 8][4];
  BI_DEV void init() {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m[r] = neg_inf();
      l[r] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
  }
};

// One key tile (staged in sK / sVt) for the warp's rows with positions p[2] (-1: none).
template <typename T, int D>
BI_DEV void attend_tile(const AttentionArgs<T>& a, const T* sQ, const T* sK, const T* sVt, int t, const int (&p)[2],
                        MmaState<D>& st) {
  using L = AttnMmaLayout<D>;
  const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
  const int c = lane % 4, k0 = t * kAttnTile;
  const bool has[2] = {k0 <= p[0], k0 <= p[1]};
  if (!warp_any(has[0] || has[1])) return;  // no row of the warp sees this tile (warp-uniform)
  // S = Q K^T: n8 fragment j = keys 8j..8j+7, k16 steps over d ascending, from +0.
  float S[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) S[j][e] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t af[4], bf[4][2];
    ldmatrix_x4(af, sQ + (warp * 16 + lane % 16) * L::LDQ + ks * 16 + (lane / 16) * 8);
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {  // matrices (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15)
      const int mat = lane / 8;
      uint32_t r[4];
      ldmatrix_x4(r, sK + (jj * 16 + (mat / 2) * 8 + lane % 8) * L::LDK + ks * 16 + (mat % 2) * 8);
      bf[2 * jj][0] = r[0];
      bf[2 * jj][1] = r[1];
      bf[2 * jj + 1][0] = r[2];
      bf[2 * jj + 1][1] = r[3];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) mma_m16n8k16<T>(S[j], af, bf[j], S[j]);
  }
  // Online softmax per row (see the top of the file for the orders).
  float al[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mt = neg_inf();
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = k0 + 8 * j + 2 * c + e;
        const float s = key <= p[r] ? mul_rn(S[j][2 * r + e], a.scale) : neg_inf();
        S[j][2 * r + e] = s;
        mt = max_sym(mt, s);
      }
    mt = max_sym(mt, warp_shfl_xor(mt, 1));
    mt = max_sym(mt, warp_shfl_xor(mt, 2));
    const float mn = mt > st.m[r] ? mt : st.m[r];
    al[r] = (st.m[r] == neg_inf()) ? 0.0f : exp_f32(sub_rn(st.m[r], mn));
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = k0 + 8 * j + 2 * c + e;
        const float pj = key <= p[r] ? exp_f32(sub_rn(S[j][2 * r + e], mn)) : 0.0f;
        S[j][2 * r + e] = pj;
        sum = add_rn(sum, pj);
      }
    sum = add_rn(sum, warp_shfl_xor(sum, 1));
    sum = add_rn(sum, warp_shfl_xor(sum, 2));
    if (has[r]) {
      st.l[r] = add_rn(mul_rn(st.l[r], al[r]), sum);
      st.m[r] = mn;
    }
  }
  // P (rounded to T) as the A operand of the two k16 key steps: the S fragments' layout.
  uint32_t pa[2][4];
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    pa[kk][0] = pack2<T>(S[2 * kk][0], S[2 * kk][1]);
    pa[kk][1] = pack2<T>(S[2 * kk][2], S[2 * kk][3]);
    pa[kk][2] = pack2<T>(S[2 * kk + 1][0], S[2 * kk + 1][1]);
    pa[kk][3] = pack2<T>(S[2 * kk + 1][2], S[2 * kk + 1][3]);
  }
#pragma unroll
  for (int jd = 0; jd < D / 16; ++jd) {  // 16 head dims: n8 blocks 2 jd, 2 jd + 1
    float o[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[h][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int mat = lane / 8;
      uint32_t r[4];
      ldmatrix_x4(r, sVt + (jd * 16 + (mat / 2) * 8 + lane % 8) * L::LDV + kk * 16 + (mat % 2) * 8);
      const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
      mma_m16n8k16<T>(o[0], pa[kk], b0, o[0]);
      mma_m16n8k16<T>(o[1], pa[kk], b1, o[1]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (has[e / 2]) st.acc[2 * jd + h][e] = add_rn(mul_rn(st.acc[2 * jd + h][e], al[e / 2]), o[h][e]);
  }
}

// The state of split s for the warp's rows: tiles of keys [s*split, (s+1)*split) up to the tile's
// last position, each staged by the whole block (block-uniform loop: every thread reaches every
// barrier).
template <typename T, int D>
BI_DEV void mma_split_state(const AttentionArgs<T>& a, const QTile& tl, const T* sQ, T* sK, T* sVt, int s,
                            const int (&p)[2], MmaState<D>& st) {
  st.init();
  const int t0 = s * (a.split / kAttnTile);
  const int t_end = (s + 1) * (a.split / kAttnTile), t_last = tl.pos_max / kAttnTile;
  const int t1 = t_end - 1 < t_last ? t_end - 1 : t_last;
  for (int t = t0; t <= t1; ++t) {
    stage_kv<T, D>(a, tl, t, sK, sVt);
    cp_async_wait<0>();
    block_sync();  // the tile is staged (and sQ, before the first tile)
    attend_tile<T, D>(a, sQ, sK, sVt, t, p, st);
    block_sync();  // everyone is done with the tile before the next one overwrites it
  }
}

// Shared-memory carve-up and the thread's two rows.
template <typename T, int D>
struct MmaBlock {
  T* sQ;
  T* sK;
  T* sVt;
  TileRow row[2];
  int p[2];
  BI_DEV explicit MmaBlock(const QTile& tl) {
    using L = AttnMmaLayout<D>;
    sQ = dynamic_smem<T>();
    sK = sQ + L::Q;
    sVt = sK + L::K;
    const int warp = int(threadIdx.x) / kWarp, lane = int(threadIdx.x) % kWarp;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row[r] = tile_row(tl, warp * 16 + lane / 4 + 8 * r);
      p[r] = row[r].p;
    }
  }
};

}  // namespace attn_mma_detail

// Sequential path: grid (q_tiles, Hk * chunks), block kAttnMmaThreads, dynamic shared memory
// attention_mma_smem_bytes<T>(D, true). Splits one after another, each folded at once; out (and lse)
// written for the tile's rows (padding tokens: zero-filled by the launcher).
template <typename T, int D>
__global__ void __launch_bounds__(kAttnMmaThreads, 1) attention_mma_kernel(AttentionArgs<T> a) {
  using namespace attn_mma_detail;
  using L = AttnMmaLayout<D>;
  QTile tl;
  if (!find_tile(a, tl)) return;  // block-uniform
  MmaBlock<T, D> blk(tl);
  stage_q<T, D>(a, tl, blk.sQ);
  // The fold (M, L, ACC): M, L in registers, ACC in shared memory, each thread's own fragment
  // elements (element i of thread x at sACC[i * threads + x]: no other thread touches them).
  const int tid = int(threadIdx.x);
  float* sACC = reinterpret_cast<float*>(blk.sVt + L::V);
  float FM[2] = {neg_inf(), neg_inf()}, FL[2] = {0.0f, 0.0f};
  for (int i = 0; i < D / 2; ++i) sACC[i * kAttnMmaThreads + tid] = 0.0f;
  const int nsplit = tl.pos_max / a.split + 1;
  for (int s = 0; s < nsplit; ++s) {
    MmaState<D> st;
    mma_split_state<T, D>(a, tl, blk.sQ, blk.sK, blk.sVt, s, blk.p, st);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (blk.p[r] < s * a.split) continue;  // the row has no key in split s: not folded
      const SplitFold f = split_fold_factors(FM[r], st.m[r]);
      FL[r] = split_fold_value(FL[r], st.l[r], f);
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& F = sACC[(j * 4 + 2 * r + e) * kAttnMmaThreads + tid];
          F = split_fold_value(F, st.acc[j][2 * r + e], f);
        }
      FM[r] = f.Mn;
    }
  }
  const int c = tid % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const TileRow& row = blk.row[r];
    if (row.p < 0) continue;
    T* out = a.out + row.tok * a.o_st + int64_t(row.h) * a.o_sh;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        out[8 * j + 2 * c + e] = from_f32<T>(div_rn(sACC[(j * 4 + 2 * r + e) * kAttnMmaThreads + tid], FL[r]));
    if (a.lse != nullptr && c == 0) a.lse[row.tok * a.lse_st + row.h] = add_rn(FM[r], log_f32(FL[r]));
  }
}

// Split-parallel path, pass 1: grid (q_tiles, Hk * chunks, ws_splits); block z computes split z of
// its tile's rows into the workspace (attention.cuh's Workspace layout; rows without keys in the
// split: nothing). Pass 2 is attention.cuh's attention_combine_kernel<T, D / 32>.
template <typename T, int D>
__global__ void __launch_bounds__(kAttnMmaThreads, 1) attention_mma_split_kernel(AttentionArgs<T> a) {
  using namespace attn_mma_detail;
  QTile tl;
  const int s = int(blockIdx.z);
  if (!find_tile(a, tl) || s > tl.pos_max / a.split) return;  // block-uniform
  MmaBlock<T, D> blk(tl);
  stage_q<T, D>(a, tl, blk.sQ);
  MmaState<D> st;
  mma_split_state<T, D>(a, tl, blk.sQ, blk.sK, blk.sVt, s, blk.p, st);
  const int c = int(threadIdx.x) % 4;
  const int64_t n = a.T_tokens * a.Hq * a.ws_splits;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const TileRow& row = blk.row[r];
    if (row.p < s * a.split) continue;  // no row, or no key in split s
    const int64_t slot = (row.tok * a.Hq + row.h) * a.ws_splits + s;
    if (c == 0) {
      a.ws[slot] = st.m[r];
      a.ws[n + slot] = st.l[r];
    }
    float* acc = a.ws + 2 * n + slot * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) acc[8 * j + 2 * c + e] = st.acc[j][2 * r + e];
  }
}

}  // namespace cuda
}  // namespace bi
