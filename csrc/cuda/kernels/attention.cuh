// CUDA batch-invariant paged attention forward (causal, GQA): attention / attention_with_lse
// (torch-free; nvcc, or g++ -DBI_CUDA_SIM for the CPU simulator). First CUDA version: SIMT,
// correctness and invariance first.
//
// Interface (used by the launcher csrc/cuda/launch_attention.cu and the simulator module
// csrc/cuda/sim/sim_attention.cpp):
//   template <typename T> struct AttentionArgs { ... }  (below; element strides, raw pointers)
//   int attention_lanes_per_thread(int D);   // NPL = ceil(D / 32), D in [1, kAttnMaxHead]
//   template <typename T, int NPL> __global__ void attention_fwd_kernel(AttentionArgs<T>);
//   grid = (T, ceil(Hq / kAttnWarps)), block = 32 * kAttnWarps, no dynamic shared memory;
//   dispatch_attention_npl(NPL, f) calls f(std::integral_constant<int, NPL>{}).
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
// function of p, D and the dtype only. The splits are processed one after another inside the warp
// with the contract's combine: the same bits a split-parallel grid + ordered combine pass would give.
//
// Performance (honest): SIMT only, no tensor cores, no shared-memory staging of K/V tiles, no
// split-parallel grid. Each warp reads the K and V rows of its kv head itself (the kAttnWarps warps
// of a block are consecutive q heads, so a GQA group mostly hits L1/L2 for the same rows), each key
// costs 5 shuffles for the dot + 1 for p_j. Expect decode to be far from memory bandwidth for long
// contexts (one warp walks all p keys sequentially: long-context decode with few sequences leaves
// most SMs idle - a split-parallel path with an ordered combine is the planned next step) and
// prefill to be an order of magnitude or more slower than FlashAttention-class tensor-core kernels.
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

}  // namespace attn_detail

template <typename T, int NPL>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(AttentionArgs<T> a) {
  using namespace attn_detail;
  const int64_t t = blockIdx.x;
  const int warp = int(threadIdx.x) / kWarp;
  const int lane = int(threadIdx.x) & (kWarp - 1);
  const int h = int(blockIdx.y) * kAttnWarps + warp;
  if (t >= a.T_tokens || h >= a.Hq) return;  // warp-uniform; no block barrier below
  const int D = a.D;
  T* out = a.out + t * a.o_st + int64_t(h) * a.o_sh;

  // The token's sequence: the largest b in [0, B) with qsl[b] <= t (empty sequences skipped).
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
  if (b < 0) {  // padding token: +0 output (and lse), as the CPU backend
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int d = lane + i * kWarp;
      if (d < D) out[d] = from_f32<T>(0.0f);
    }
    if (a.lse != nullptr && lane == 0) a.lse[t * a.lse_st + h] = 0.0f;
    return;
  }
  const int q0 = a.qsl[b], qlen = a.qsl[b + 1] - q0;
  const int p = a.seq_lens[b] - qlen + int(t - q0);  // absolute position: keys 0..p
  const int g = h / (a.Hq / a.Hk);
  const int32_t* bt = a.bt + int64_t(b) * a.bt_s;

  float q[NPL];
  load_row<T, NPL>(a.q + t * a.q_st + int64_t(h) * a.q_sh, lane, D, q);

  const float ninf = neg_inf();
  float M = ninf, L = 0.0f, ACC[NPL];
#pragma unroll
  for (int i = 0; i < NPL; ++i) ACC[i] = 0.0f;

  const int split = a.split;
  const int nsplit = p / split + 1;
  for (int s = 0; s < nsplit; ++s) {
    float m = ninf, l = 0.0f, acc[NPL];
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[i] = 0.0f;
    const int kend = (s + 1) * split < p + 1 ? (s + 1) * split : p + 1;  // keys [s*split, kend)
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
          const int64_t blk = bt[pos / a.block_size];
          const int off = pos % a.block_size;
          float k[NPL];
          load_row<T, NPL>(a.kc + blk * a.kc_sb + int64_t(off) * a.kc_ss + int64_t(g) * a.kc_sh, lane, D, k);
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
        const int64_t blk = bt[pos / a.block_size];
        const int off = pos % a.block_size;
        float v[NPL];
        load_row<T, NPL>(a.vc + blk * a.vc_sb + int64_t(off) * a.vc_ss + int64_t(g) * a.vc_sh, lane, D, v);
        l = add_rn(l, pj);
#pragma unroll
        for (int i = 0; i < NPL; ++i) acc[i] = fma_rn(pj, v[i], acc[i]);
      }
      m = mn;
    }
    // combine split s into (M, L, ACC)
    const float Mn = m > M ? m : M;
    const float e1 = (M == ninf) ? 0.0f : exp_f32(sub_rn(M, Mn));
    const float e2 = exp_f32(sub_rn(m, Mn));
    L = add_rn(mul_rn(L, e1), mul_rn(l, e2));
#pragma unroll
    for (int i = 0; i < NPL; ++i) ACC[i] = add_rn(mul_rn(ACC[i], e1), mul_rn(acc[i], e2));
    M = Mn;
  }
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = lane + i * kWarp;
    if (d < D) out[d] = from_f32<T>(div_rn(ACC[i], L));
  }
  if (a.lse != nullptr && lane == 0) a.lse[t * a.lse_st + h] = add_rn(M, log_f32(L));
}

}  // namespace cuda
}  // namespace bi
