// CUDA batch-invariant paged attention forward (causal, GQA): attention / attention_with_lse
// (torch-free; nvcc, or g++ -DBI_CUDA_SIM for the CPU simulator), SIMT kernels: the path of fp32
// (IEEE, no TF32) and of bf16 / fp16 head sizes other than 64 and 128. bf16 / fp16 with D = 64 or
// 128 run the tensor-core kernels of attention_mma.cuh for every launch (prefill, chunked prefill
// and decode alike); which kernels run is a function of (dtype, D) only (attention_plan.cuh,
// attention_uses_mma), so a row's bits never depend on the launch. Both families share this
// file's AttentionArgs, workspace layout, combine kernel and split fold (split_fold_factors /
// split_fold_value).
//
// Interface (used through attention_plan.cuh by the launcher csrc/cuda/launch_attention.cu and the
// simulator module csrc/cuda/sim/sim_attention.cpp):
//   template <typename T> struct AttentionArgs { ... }  (below; element strides, raw pointers)
//   int attention_lanes_per_thread(int D);   // NPL = ceil(D / 32), D in [1, kAttnMaxHead]
//   template <typename T, int NPL> __global__ void attention_fwd_kernel(AttentionArgs<T>);
//   grid = (T, ceil(Hq / kAttnWarps)), block = 32 * kAttnWarps, no dynamic shared memory;
//   dispatch_attention_npl(NPL, f) calls f(std::integral_constant<int, NPL>{}).
//   Split-parallel path (long contexts, few rows): attention_split_kernel<T, NPL> on grid
//   (T, ceil(Hq / kAttnWarps), S) writes each split's (m, l, acc) to an fp32 workspace
//   (a.ws, attention_workspace_floats(T, Hq, D, S) floats, S = a.ws_splits =
//   attention_max_splits(block_table.size(1) * block_size, split): from shapes, no host sync),
//   then attention_combine_kernel<T, NPL> on grid (T, ceil(Hq / kAttnWarps)) folds them (also
//   the tensor-core split path's pass 2); attention_plan (attention_plan.cuh) chooses the path
//   (kAttnPathAuto: by the launch's shapes only).
// T in {float, __half, __nv_bfloat16}. The grid is a function of the shapes only (T, Hq): no
// metadata value is read on the host. Block (x = t, y) warp w handles (token t, q head
// h = y * kAttnWarps + w), kv head h / (Hq / Hk); warps with h >= Hq return at once (no block
// barrier is used, warps are independent). The token's sequence b is found on the device by a
// binary search of query_start_loc (the largest b with qsl[b] <= t); a token outside
// [qsl[0], qsl[B]) is padding: its output row is +0 (and its lse 0), as in the CPU backend.
//
// Per (token at position p = seq_lens[b] - q_len_b + i, head h), exactly the contract of
// python/batch_invariant/contract.py ("Attention"), the operations of the CPU backend's kernel
// (csrc/cpu/kernels/attention.h) except the dot-product order and log:
//   * q, k, v converted to fp32 (exact); fscale = fp32(scale) (rounded once, by the launcher).
//   * q.k in fp32, this backend's fixed order over D: lane l (0..31) accumulates the dims
//     d = l, l + 32, l + 64, ... < D in ascending order, lane = fma_rn(q[d], k[d], lane) from +0;
//     the 32 lane partials are combined by the xor butterfly (16, 8, 4, 2, 1) with add_rn (every
//     lane ends with the same bits); s_j = mul_rn(dot, fscale).
//   * keys 0..p in tiles of ATTN_TILE_N = 32 logical keys (tile t = keys [32t, 32t + 32) cut at p),
//     grouped in splits of `split` = ATTN_SPLIT keys (the launcher passes the contract value; the
//     argument exists so that the tests' negative control can pass another). Per split an online
//     softmax state (m, l, acc[D]) from (-inf, 0, +0); per tile with n valid keys:
//       mt = s_0; mt = (s_j > mt ? s_j : mt), j = 1..n-1;   m' = (mt > m ? mt : m)
//       a = (m == -inf) ? 0 : exp_f32(m - m');  p_j = exp_f32(s_j - m')
//       l = l * a, then l = l + p_j for j ascending
//       acc[d] = acc[d] * a, then acc[d] = fma_rn(p_j, v_j[d], acc[d]) for j ascending
//   * splits s = 0 .. p / split combined left to right into (M, L, ACC) from (-inf, 0, +0):
//       Mn = (m_s > M ? m_s : M); e1 = (M == -inf) ? 0 : exp_f32(M - Mn); e2 = exp_f32(m_s - Mn)
//       L = L*e1 + l_s*e2;  ACC[d] = ACC[d]*e1 + acc_s[d]*e2   (two mul_rn, one add_rn)
//   * out[d] = round_to_T(ACC[d] / L) (div_rn, one RNE rounding); lse = add_rn(M, log_f32(L)).
// exp_f32 / log_f32: row_common.cuh (plain _rn arithmetic: the same bits on device and simulator;
// exp_f32 is the CPU backend's polynomial, log_f32 this backend's own, so lse bits differ from
// the CPU backend's logf by design; the dot order differs from the CPU's 16-lane order too: bits
// differ between backends, never within one). Nothing depends on the page size, the block table,
// the query chunk, the other tokens of the launch or the grid: the per-row operation sequence is a
// function of p, D and the dtype only. The sequential path processes the splits one after another
// inside the warp and folds each at once; the split-parallel path computes them in separate warps
// and the combine kernel folds them in the same order with the same function (combine_split):
// identical bits (tests/cuda/test_cuda_sim_attention.py checks it bitwise).
//
// Performance (honest): these kernels are SIMT, no tensor cores, no shared-memory staging of K/V
// tiles (bf16 / fp16 at D = 64 / 128 take attention_mma.cuh instead). Each
// warp reads the K and V rows of its kv head itself (the kAttnWarps warps of a block are
// consecutive q heads, so a GQA group mostly hits L1/L2 for the same rows), each key costs 5
// shuffles for the dot + 1 for p_j. Long-context decode with few sequences takes the split-parallel
// path (one warp per split of 512 keys instead of one per row: up to ctx / 512 times more warps,
// plus a workspace round trip of (D + 2) floats per split and a second launch); prefill stays an
// order of magnitude or more slower than FlashAttention-class tensor-core kernels.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../../generated/bi_contract.h"
#include "row_common.cuh"

namespace bi {
namespace cuda {

constexpr int kAttnTile = contract::ATTN_TILE_N;  // keys per tile (= warp width: one p_j per lane)
constexpr int kAttnWarps = 4;                      // q heads per block (one warp each)
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kAttnMaxNpl = 8;                     // head size <= 256
constexpr int kAttnMaxHead = kAttnMaxNpl * kWarp;
static_assert(kAttnTile == kWarp, "the attention kernel holds one key of a tile per lane");
static_assert(contract::ATTN_SPLIT % contract::ATTN_TILE_N == 0, "ATTN_SPLIT must be a multiple of ATTN_TILE_N");

template <typename T>
struct AttentionArgs {
  const T* q; int64_t q_st, q_sh;              // q[t, h, d] = q[t*q_st + h*q_sh + d]
  const T* kc; int64_t kc_sb, kc_ss, kc_sh;    // key_cache[blk, off, g, d]
  const T* vc; int64_t vc_sb, vc_ss, vc_sh;    // value_cache[blk, off, g, d]
  const int32_t* qsl;                          // [B + 1]
  const int32_t* seq_lens;                     // [B]
  const int32_t* bt; int64_t bt_s;             // block_table[b, i] = bt[b*bt_s + i]
  int64_t T_tokens;                            // q.size(0)
  int B, Hq, Hk, D, block_size;
  int split;                                   // keys per split: contract::ATTN_SPLIT (tests: other)
  float scale;
  T* out; int64_t o_st, o_sh;                  // out[t, h, d]
  float* lse; int64_t lse_st;                  // optional (nullptr): lse[t*lse_st + h]
  float* ws; int64_t ws_splits;                // split-parallel path only: workspace, splits per row
  int kv_vec;                                  // tensor-core kernels: K / V tiles by 16-byte copies (1)
                                               // or element loads (0); moves data only
};

inline int attention_lanes_per_thread(int D) { return (D + kWarp - 1) / kWarp; }

template <typename F>
void dispatch_attention_npl(int npl, F&& f) {
  switch (npl) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default:
      throw std::invalid_argument("bi::cuda::dispatch_attention_npl: head size needs " + std::to_string(npl) +
                                  " elements per lane (1..8: head size <= 256)");
  }
}

namespace attn_detail {

BI_DEV float neg_inf() { return uint_as_float(0xff800000u); }

// q.k_j: lane partials over d = lane + 32 i (i ascending, d < D) from +0, xor butterfly.
template <int NPL>
BI_DEV float warp_dot(const float (&q)[NPL], const float (&k)[NPL], int lane, int D) {
  float part = 0.0f;
#pragma unroll
  for (int i = 0; i < NPL; ++i)
    if (lane + i * kWarp < D) part = fma_rn(q[i], k[i], part);
#pragma unroll
  for (int m = kWarp / 2; m >= 1; m >>= 1) part = add_rn(part, warp_shfl_xor(part, m));
  return part;
}

template <typename T, int NPL>
BI_DEV void load_row(const T* row, int lane, int D, float (&v)[NPL]) {
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = lane + i * kWarp;
    v[i] = d < D ? to_f32(row[d]) : 0.0f;
  }
}

// The warp's (token t, q head h) and lane: block (t, y), warp w -> h = y * kAttnWarps + w.
struct WarpRow {
  int64_t t;
  int h, lane;
};

// One (token, head) row's metadata: its sequence b, absolute position p (keys 0..p), kv head g and
// block-table row.
struct AttnRow {
  int b, p, g;
  const int32_t* bt;
};

// Padding token: +0 output (and lse), as the CPU backend.
template <typename T, int NPL>
BI_DEV void write_padding(const AttentionArgs<T>& a, const WarpRow& w) {
  T* out = a.out + w.t * a.o_st + int64_t(w.h) * a.o_sh;
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = w.lane + i * kWarp;
    if (d < a.D) out[d] = from_f32<T>(0.0f);
  }
  if (a.lse != nullptr && w.lane == 0) a.lse[w.t * a.lse_st + w.h] = 0.0f;
}

// The warp's row (w) and its metadata (r). False (warp-uniform) when the warp has no row (h >= Hq)
// or the token is padding (outside [qsl[0], qsl[B]); its output is written when WRITE_PADDING).
// No block barrier is used after this: the warps of a block are independent.
template <bool WRITE_PADDING, int NPL, typename T>
BI_DEV bool begin_row(const AttentionArgs<T>& a, WarpRow& w, AttnRow& r) {
  w.t = blockIdx.x;
  w.h = int(blockIdx.y) * kAttnWarps + int(threadIdx.x) / kWarp;
  w.lane = int(threadIdx.x) & (kWarp - 1);
  if (w.t >= a.T_tokens || w.h >= a.Hq) return false;
  // The token's sequence: the largest b in [0, B) with qsl[b] <= t (empty sequences skipped).
  const int64_t t = w.t;
  int b = -1;
  if (a.B > 0 && int64_t(a.qsl[0]) <= t) {
    int lo = 0, hi = a.B - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (int64_t(a.qsl[mid]) <= t) lo = mid;
      else hi = mid - 1;
    }
    if (t < int64_t(a.qsl[lo + 1])) b = lo;
  }
  if (b < 0) {
    if constexpr (WRITE_PADDING) write_padding<T, NPL>(a, w);
    return false;
  }
  const int q0 = a.qsl[b], qlen = a.qsl[b + 1] - q0;
  r.b = b;
  r.p = a.seq_lens[b] - qlen + int(t - q0);  // absolute position: keys 0..p
  r.g = w.h / (a.Hq / a.Hk);
  r.bt = a.bt + int64_t(b) * a.bt_s;
  return true;
}

// An online softmax state: a split's (m, l, acc) or the fold of splits (M, L, ACC); starts at
// (-inf, 0, +0).
template <int NPL>
struct SoftmaxState {
  float m, l, acc[NPL];
  BI_DEV void init() {
    m = neg_inf();
    l = 0.0f;
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[i] = 0.0f;
  }
};

// The online softmax state (m, l, acc) of split s of row (t, h): keys [s*split, min((s+1)*split, p+1)),
// from (-inf, 0, +0), tile by tile (the contract's per-tile update, see the top of the file).
template <typename T, int NPL>
BI_DEV void split_state(const AttentionArgs<T>& a, const WarpRow& w, const AttnRow& r, const float (&q)[NPL], int s,
                        SoftmaxState<NPL>& st) {
  const int D = a.D, lane = w.lane;
  const float ninf = neg_inf();
  st.init();
  float& m = st.m;
  float& l = st.l;
  float (&acc)[NPL] = st.acc;
  const int split = a.split;
  const int kend = (s + 1) * split < r.p + 1 ? (s + 1) * split : r.p + 1;  // keys [s*split, kend)
  for (int k0 = s * split; k0 < kend; k0 += kAttnTile) {
    const int n = kend - k0 < kAttnTile ? kend - k0 : kAttnTile;  // valid keys of the tile
    // scores: every lane gets s_j of every key j (butterfly); lane j keeps its own as my_s
    float sc[kAttnTile];
    float my_s = ninf;
#pragma unroll
    for (int j = 0; j < kAttnTile; ++j) {
      sc[j] = ninf;
      if (j < n) {  // warp-uniform
        const int pos = k0 + j;
        const int64_t blk = r.bt[pos / a.block_size];
        const int off = pos % a.block_size;
        float k[NPL];
        load_row<T, NPL>(a.kc + blk * a.kc_sb + int64_t(off) * a.kc_ss + int64_t(r.g) * a.kc_sh, lane, D, k);
        sc[j] = mul_rn(warp_dot<NPL>(q, k, lane, D), a.scale);
        if (lane == j) my_s = sc[j];
      }
    }
    float mt = sc[0];
#pragma unroll
    for (int j = 1; j < kAttnTile; ++j)
      if (j < n) mt = sc[j] > mt ? sc[j] : mt;
    const float mn = mt > m ? mt : m;
    const float al = (m == ninf) ? 0.0f : exp_f32(sub_rn(m, mn));
    const float my_p = lane < n ? exp_f32(sub_rn(my_s, mn)) : 0.0f;
    l = mul_rn(l, al);
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[i] = mul_rn(acc[i], al);
    for (int j = 0; j < n; ++j) {  // n warp-uniform
      const float pj = warp_shfl(my_p, j);
      const int pos = k0 + j;
      const int64_t blk = r.bt[pos / a.block_size];
      const int off = pos % a.block_size;
      float v[NPL];
      load_row<T, NPL>(a.vc + blk * a.vc_sb + int64_t(off) * a.vc_ss + int64_t(r.g) * a.vc_sh, lane, D, v);
      l = add_rn(l, pj);
#pragma unroll
      for (int i = 0; i < NPL; ++i) acc[i] = fma_rn(pj, v[i], acc[i]);
    }
    m = mn;
  }
}

// The contract's split combine, scalar pieces (also used by the tensor-core kernels of
// attention_mma.cuh, so that every path folds with the same operations): the factors for folding a
// split with max m_s into a running max M, and one folded value (l or one acc element).
struct SplitFold {
  float Mn, e1, e2;
};
BI_DEV SplitFold split_fold_factors(float M, float m_s) {
  SplitFold f;
  f.Mn = m_s > M ? m_s : M;
  f.e1 = (M == neg_inf()) ? 0.0f : exp_f32(sub_rn(M, f.Mn));
  f.e2 = exp_f32(sub_rn(m_s, f.Mn));
  return f;
}
BI_DEV float split_fold_value(float F, float s, const SplitFold& f) { return add_rn(mul_rn(F, f.e1), mul_rn(s, f.e2)); }

// The contract's split combine: F = (M, L, ACC) <- F (+) (m, l, acc). Both paths (the in-warp
// sequential fold and the split-parallel combine kernel) fold splits 0, 1, ... with this.
template <int NPL>
BI_DEV void combine_split(SoftmaxState<NPL>& F, const SoftmaxState<NPL>& s) {
  const SplitFold f = split_fold_factors(F.m, s.m);
  F.l = split_fold_value(F.l, s.l, f);
#pragma unroll
  for (int i = 0; i < NPL; ++i) F.acc[i] = split_fold_value(F.acc[i], s.acc[i], f);
  F.m = f.Mn;
}

template <typename T, int NPL>
BI_DEV void load_q(const AttentionArgs<T>& a, const WarpRow& w, float (&q)[NPL]) {
  load_row<T, NPL>(a.q + w.t * a.q_st + int64_t(w.h) * a.q_sh, w.lane, a.D, q);
}

// out[d] = ACC[d] / L rounded to T; lse = M + log(L).
template <typename T, int NPL>
BI_DEV void write_result(const AttentionArgs<T>& a, const WarpRow& w, const SoftmaxState<NPL>& F) {
  T* out = a.out + w.t * a.o_st + int64_t(w.h) * a.o_sh;
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = w.lane + i * kWarp;
    if (d < a.D) out[d] = from_f32<T>(div_rn(F.acc[i], F.l));
  }
  if (a.lse != nullptr && w.lane == 0) a.lse[w.t * a.lse_st + w.h] = add_rn(F.m, log_f32(F.l));
}

// Workspace of the split-parallel path, n = T * Hq * ws_splits slots (attention_workspace_floats):
// split s of row (t, h) is slot (t * Hq + h) * ws_splits + s, its m at ws[slot], l at
// ws[n + slot], acc[d] at ws[2n + slot * D + d].
template <typename T>
struct Workspace {
  float* m;
  float* l;
  float* acc;
  int64_t slot;
  BI_DEV Workspace(const AttentionArgs<T>& a, const WarpRow& w, int s) {
    const int64_t n = a.T_tokens * a.Hq * a.ws_splits;
    slot = (w.t * a.Hq + w.h) * a.ws_splits + s;
    m = a.ws + slot;
    l = a.ws + n + slot;
    acc = a.ws + 2 * n + slot * a.D;
  }
};

}  // namespace attn_detail

// Sequential path: one warp per (token, head) runs the splits one after another, folding each
// into (M, L, ACC) as soon as it is done.
template <typename T, int NPL>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(AttentionArgs<T> a) {
  using namespace attn_detail;
  WarpRow w;
  AttnRow r;
  if (!begin_row</*WRITE_PADDING=*/true, NPL>(a, w, r)) return;
  float q[NPL];
  load_q<T, NPL>(a, w, q);
  SoftmaxState<NPL> F;
  F.init();
  const int nsplit = r.p / a.split + 1;
  for (int s = 0; s < nsplit; ++s) {
    SoftmaxState<NPL> st;
    split_state<T, NPL>(a, w, r, q, s, st);
    combine_split<NPL>(F, st);
  }
  write_result<T, NPL>(a, w, F);
}

// Split-parallel path, pass 1: grid (T, ceil(Hq / kAttnWarps), ws_splits); warp w of block (t, y, s)
// computes split s of (t, h = y * kAttnWarps + w) into the workspace (nothing when s is past the
// row's last split or the token is padding). Pass 2 (attention_combine_kernel) folds them.
template <typename T, int NPL>
__global__ void __launch_bounds__(kAttnThreads) attention_split_kernel(AttentionArgs<T> a) {
  using namespace attn_detail;
  WarpRow w;
  AttnRow r;
  const int s = int(blockIdx.z);
  if (!begin_row</*WRITE_PADDING=*/false, NPL>(a, w, r) || s > r.p / a.split) return;
  float q[NPL];
  load_q<T, NPL>(a, w, q);
  SoftmaxState<NPL> st;
  split_state<T, NPL>(a, w, r, q, s, st);
  const Workspace<T> ws(a, w, s);
  if (w.lane == 0) {
    *ws.m = st.m;
    *ws.l = st.l;
  }
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = w.lane + i * kWarp;
    if (d < a.D) ws.acc[d] = st.acc[i];
  }
}

// Split-parallel path, pass 2: grid (T, ceil(Hq / kAttnWarps)); one warp per (token, head) folds
// the workspace's splits 0 .. p / split left to right with combine_split (the sequential path's
// fold, operation for operation: the same bits), then writes out / lse. Splits past ws_splits
// (only with seq_lens beyond the block table's capacity: invalid input) are not read.
template <typename T, int NPL>
__global__ void __launch_bounds__(kAttnThreads) attention_combine_kernel(AttentionArgs<T> a) {
  using namespace attn_detail;
  WarpRow w;
  AttnRow r;
  if (!begin_row</*WRITE_PADDING=*/true, NPL>(a, w, r)) return;
  SoftmaxState<NPL> F;
  F.init();
  const int last = r.p / a.split;
  const int nsplit = last < a.ws_splits ? last + 1 : int(a.ws_splits);
  for (int s = 0; s < nsplit; ++s) {
    const Workspace<T> ws(a, w, s);
    SoftmaxState<NPL> st;
    st.m = *ws.m;
    st.l = *ws.l;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int d = w.lane + i * kWarp;
      st.acc[i] = d < a.D ? ws.acc[d] : 0.0f;
    }
    combine_split<NPL>(F, st);
  }
  write_result<T, NPL>(a, w, F);
}

// ------------------------------------------------------------------------------------------
// Host side: the split-parallel path's sizes and the choice between the paths. Functions of the
// shapes (and the device's SM count) only - never of metadata values - and the choice does not
// change any bit (both paths run the same operations; see attention_combine_kernel).

// Splits per row bounded by the context capacity max_ctx = block_table.size(1) * block_size
// (seq_lens[b] <= max_ctx for every valid input).
inline int64_t attention_max_splits(int64_t max_ctx, int split) {
  return max_ctx <= 0 ? 1 : (max_ctx + split - 1) / split;
}

// fp32 elements of the workspace: m, l and acc[D] per (token, head, split).
inline int64_t attention_workspace_floats(int64_t T, int64_t Hq, int64_t D, int64_t splits) {
  return T * Hq * splits * (D + 2);
}

enum AttnPath : int { kAttnPathAuto = 0, kAttnPathSequential = 1, kAttnPathSplit = 2 };

// The auto rule (attention_plan in attention_plan.cuh, shared by the launcher and the simulator):
// split-parallel when rows can take more than one split, the sequential grid fills less than half
// of sm_count * kAttnSplitBlocksPerSm blocks and the workspace stays under kAttnMaxWorkspaceBytes
// (and the split grid fits gridDim.z).
constexpr int kAttnSplitBlocksPerSm = 4;
constexpr int64_t kAttnMaxWorkspaceBytes = int64_t(256) << 20;

}  // namespace cuda
}  // namespace bi
