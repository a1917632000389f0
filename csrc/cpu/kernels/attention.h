// Batch-invariant paged attention (causal, GQA) and KV-cache write: framework-free kernel bodies.
//
// Per (query token, head), with the query at absolute position p (keys 0..p), the arithmetic is
// exactly the contract of python/batch_invariant/contract.py (section "Attention"):
//   * q and k are converted to fp32 (exact); fscale = fp32(scale) (rounded once).
//   * tiles of ATTN_TILE_N = 32 logical keys (tile t = keys [32t, 32t+32) cut at p), grouped in
//     splits of ATTN_SPLIT = 512 keys. Per split an online-softmax state (m, l, acc[D]) starting
//     at (-inf, 0, +0).
//   * s_j = dot(q, k_j) * fscale, dot = 16 fp32 lanes, lane l accumulates d = 16c + l, c ascending,
//     lane = fma(q[d], k[d], lane), missing dims of the last chunk are +0 * +0 products; then the
//     contract lane tree (8, 4, 2, 1). One fp32 multiply by fscale.
//   * per tile (n valid keys, j ascending):
//       mt = s_0; mt = (s_j > mt ? s_j : mt) for j = 1..n-1;  m' = (mt > m ? mt : m)
//       a  = (m == -inf) ? 0 : exp_f32(m - m')
//       p_j = exp_f32(s_j - m')
//       l = l * a;        then l = l + p_j            for j ascending (sequential fp32 adds)
//       acc[d] = acc[d] * a; then acc[d] = fma(p_j, v_j[d], acc[d]) for j ascending
//       m = m'
//   * splits (only those holding at least one key, i.e. s <= p / 512) are combined left to right
//     into (M, L, ACC) starting at (-inf, 0, +0):
//       Mn = (m_s > M ? m_s : M); e1 = (M == -inf) ? 0 : exp_f32(M - Mn); e2 = exp_f32(m_s - Mn)
//       L = L*e1 + l_s*e2;  ACC[d] = ACC[d]*e1 + acc_s[d]*e2   (two products, one add; no fma)
//   * out[d] = round_to_dtype(ACC[d] / L)   (fp32 division, one rounding, RNE).
//   * optional log-sum-exp of the scaled scores (attention_with_lse): lse = M + std::log(L), fp32
//     (logf of the final L, one fp32 add; no fma). It does not change any other operation.
// Nothing here depends on the page size, the block table, the other rows of the launch, the query
// block a row is processed in, or the thread count: the per-row operation sequence is fixed by p.
// The portable path performs the identical operations (std::fma where the vector code uses fma),
// so it gives the same bits as the AVX-512 path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common.h"
#include "attention_tiles.h"

namespace bi {
namespace cpu {
namespace attn {

constexpr int kSplit = contract::ATTN_SPLIT;
constexpr int kTilesPerSplit = kSplit / kTile;
static_assert(kSplit % kTile == 0, "ATTN_SPLIT must be a multiple of ATTN_TILE_N");
static_assert(kTile == 32, "score buffers assume 32-key tiles");

// ------------------------------------------------------------------------------------------------
// KV-cache write: rows [t0, t1) of key/value [T, Hk, D] into caches [NB, BS, Hk, D] (same dtype).
template <typename T>
struct KvWrite {
  const T* key; int64_t k_st, k_sh;   // key[t, h, d] = key[t*k_st + h*k_sh + d]
  const T* value; int64_t v_st, v_sh;
  T* kc; int64_t kc_sb, kc_ss, kc_sh;  // cache[blk, off, h, d]
  T* vc; int64_t vc_sb, vc_ss, vc_sh;
  const int64_t* slots;
  int64_t Hk, D, block_size;
};

template <typename T>
static inline void write_kv_rows(const KvWrite<T>& w, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t slot = w.slots[t];
    if (slot < 0) continue;
    int64_t blk = slot / w.block_size, off = slot % w.block_size;
    for (int64_t h = 0; h < w.Hk; ++h) {
      std::memcpy(w.kc + blk * w.kc_sb + off * w.kc_ss + h * w.kc_sh, w.key + t * w.k_st + h * w.k_sh,
                  sizeof(T) * w.D);
      std::memcpy(w.vc + blk * w.vc_sb + off * w.vc_ss + h * w.vc_sh,
                  w.value + t * w.v_st + h * w.v_sh, sizeof(T) * w.D);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Attention problem description (raw pointers, element strides).
template <typename T>
struct Problem {
  const T* q; int64_t q_st, q_sh;          // q[t, h, d]
  const T* kc; int64_t kc_sb, kc_ss, kc_sh;  // key_cache[blk, off, h, d]
  const T* vc; int64_t vc_sb, vc_ss, vc_sh;
  const int32_t* qsl;       // [B+1]
  const int32_t* seq_lens;  // [B]
  const int32_t* bt; int64_t bt_s;  // block_table[b, i] = bt[b*bt_s + i]
  int Hq, Hk, D, Dp, block_size;    // Dp = D rounded up to a multiple of 16
  float scale;
  T* out; int64_t o_st, o_sh;
  float* part; int nsplit_max;  // split-parallel mode: partial states [T*Hq][nsplit_max][Dp + 2]
  float* lse = nullptr; int64_t lse_st = 0;  // optional: lse[t * lse_st + h] = M + log(L) (fp32)
};

// One unit of work: sequence b, kv heads [g0, g1), queries [qi0, qi1) of that sequence (indices within the
// sequence), splits [s_lo, s_hi). final_out: write outputs (all splits of every row are in range);
// otherwise write each split's partial state to Problem::part.
struct Item {
  int b, g0, g1, qi0, qi1, s_lo, s_hi;  // kv heads [g0, g1)
  bool final_out;
};

// Scratch floats for R rows (the launcher allocates one buffer per thread).
// Row-indexed arrays have a stride Rs = R rounded up to 16 (the softmax is vectorised over rows).
static inline int64_t row_stride(int64_t R) { return (R + 15) / 16 * 16; }
// R: rows of the largest item.
static inline int64_t scratch_floats(int64_t R, int64_t Dp) {
  const int64_t Rs = row_stride(R);
  return Rs * Dp * 3 + Rs * kTile + Rs * 5 + 2 * kTile * Dp + 64;
}
struct Scratch {
  float *qf, *s, *acc, *ACC, *m, *l, *a, *M, *L, *kt, *vt;
  int* nr;  // valid keys of each row in the current tile (int array of Rs entries)
  int Rs;   // s is [kTile][Rs]: s[j * Rs + r]
  static Scratch carve(float* base, int* ibase, int64_t R, int64_t Dp) {
    Scratch S;
    const int64_t Rs = row_stride(R);
    S.Rs = int(Rs);
    float* p = base;
    S.qf = p; p += Rs * Dp;
    S.acc = p; p += Rs * Dp;
    S.ACC = p; p += Rs * Dp;
    S.s = p; p += Rs * kTile;
    S.m = p; p += Rs;
    S.l = p; p += Rs;
    S.a = p; p += Rs;
    S.M = p; p += Rs;
    S.L = p; p += Rs;
    S.kt = p; p += kTile * Dp;  // [kTile][Dp], one kv head at a time
    S.vt = p; p += kTile * Dp;
    S.nr = ibase;
    return S;
  }
};



// ================================================================================================
// Driver (plain C++; calls the ISA building blocks per tile).

// Combine one split state (m_s, l_s, acc_s) into the running (M, L, ACC).
template <bool kAvx>
static inline void combine_state(float& M, float& L, float* ACC, float m_s, float l_s,
                                 const float* acc_s, int Dp) {
  const float Mn = m_s > M ? m_s : M;
  const float e1 = (M == kNegInf) ? 0.0f : exp_f32(M - Mn);
  const float e2 = exp_f32(m_s - Mn);
  const float x = L * e1, y = l_s * e2;
  L = x + y;
  M = Mn;
#if BI_X86
  if (kAvx) { avx::combine(ACC, acc_s, e1, e2, Dp); return; }
#endif
  portable::combine(ACC, acc_s, e1, e2, Dp);
}

template <typename T, bool kAvx>
static inline void finalize_row(const float* ACC, float L, T* out, int D) {
#if BI_X86
  if (kAvx) { avx::finalize<T>(ACC, L, out, D); return; }
#endif
  portable::finalize<T>(ACC, L, out, D);
}

// log-sum-exp of the final combined state (identical in every path: scalar, computed once per row).
static inline float lse_of(float M, float L) {
  const float lg = std::log(L);
  return M + lg;
}

template <typename T, bool kAvx>
void run_item(const Problem<T>& P, const Item& it, const Scratch& S) {
  const int G = P.Hq / P.Hk;
  const int Dp = P.Dp, D = P.D;
  const int t0 = P.qsl[it.b];
  const int qlen = P.qsl[it.b + 1] - t0;
  const int ctx = P.seq_lens[it.b];
  const int nq = it.qi1 - it.qi0;
  const int ng = it.g1 - it.g0;
  const int RG = nq * G;  // rows per kv head
  const int R = ng * RG;
  const int pmin = ctx - qlen + it.qi0;  // position of the first query of the block
  const int pmax = pmin + nq - 1;
  const int32_t* bt = P.bt + (int64_t)it.b * P.bt_s;

  // rows: r = ((g - g0) * nq + (qi - qi0)) * G + hh, head h = g*G + hh; within one kv head the
  // number of keys per row is nondecreasing in r.
  auto row_tok = [&](int r) { return t0 + it.qi0 + (r % RG) / G; };
  auto row_head = [&](int r) { return (it.g0 + r / RG) * G + r % G; };
  auto row_pos = [&](int r) { return pmin + (r % RG) / G; };
  for (int r = 0; r < R; ++r) {
    const T* src = P.q + (int64_t)row_tok(r) * P.q_st + (int64_t)row_head(r) * P.q_sh;
#if BI_X86
    if (kAvx) { avx::load_row<T>(src, S.qf + (int64_t)r * Dp, D, Dp); continue; }
#endif
    portable::load_row<T>(src, S.qf + (int64_t)r * Dp, D, Dp);
  }
  if (it.final_out) {
    for (int r = 0; r < R; ++r) {
      S.M[r] = kNegInf;
      S.L[r] = 0.0f;
    }
    std::memset(S.ACC, 0, sizeof(float) * R * Dp);
  }
  auto slot_ptr = [&](const T* base, int64_t sb, int64_t ss, int64_t sh, int pos, int g) {
    const int64_t blk = bt[pos / P.block_size];
    const int off = pos % P.block_size;
    return base + blk * sb + (int64_t)off * ss + (int64_t)g * sh;
  };
  const int ntiles = pmax / kTile + 1;
  const int s_hi = it.s_hi < pmax / kSplit + 1 ? it.s_hi : pmax / kSplit + 1;
  for (int s = it.s_lo; s < s_hi; ++s) {
    const int ks = s * kSplit;
    for (int r = 0; r < R; ++r) {
      S.m[r] = kNegInf;
      S.l[r] = 0.0f;
    }
    std::memset(S.acc, 0, sizeof(float) * R * Dp);
    const int tend = (s + 1) * kTilesPerSplit < ntiles ? (s + 1) * kTilesPerSplit : ntiles;
    for (int tile = s * kTilesPerSplit; tile < tend; ++tile) {
      const int k0 = tile * kTile;
      const int q_first = k0 > pmin ? k0 - pmin : 0;  // first query (in the block) with keys here
      const int nk = (pmax + 1 - k0) < kTile ? (pmax + 1 - k0) : kTile;
      // prefetch the next tile of this item into L2, slot-major (memory order; decode is memory-bound)
      if (tile + 1 < tend || s + 1 < s_hi) {
        const int k1 = k0 + kTile;
        const int nk1 = (pmax + 1 - k1) < kTile ? (pmax + 1 - k1) : kTile;
        const int64_t row_bytes = int64_t(D) * int64_t(sizeof(T));
        for (int j = 0; j < nk1; ++j)
          for (int g = it.g0; g < it.g1; ++g) {
            const char* kp = reinterpret_cast<const char*>(slot_ptr(P.kc, P.kc_sb, P.kc_ss, P.kc_sh, k1 + j, g));
            const char* vp = reinterpret_cast<const char*>(slot_ptr(P.vc, P.vc_sb, P.vc_ss, P.vc_sh, k1 + j, g));
            for (int64_t o = 0; o < row_bytes; o += 64) {
              __builtin_prefetch(kp + o, 0, 2);
              __builtin_prefetch(vp + o, 0, 2);
            }
          }
      }
      const int nk16 = (nk + 15) & ~15;
      for (int gl = 0; gl < ng; ++gl) {
        float* kt = S.kt;
        const float* vt = S.vt;
        // gather + convert the tile of kv head g (logical keys k0 .. k0+nk-1)
        const int g = it.g0 + gl;
        for (int j = 0; j < nk; ++j) {
          const T* kp = slot_ptr(P.kc, P.kc_sb, P.kc_ss, P.kc_sh, k0 + j, g);
          const T* vp = slot_ptr(P.vc, P.vc_sb, P.vc_ss, P.vc_sh, k0 + j, g);
#if BI_X86
          if (kAvx) {
            avx::load_row<T>(kp, S.kt + (int64_t)j * Dp, D, Dp);
            avx::load_row<T>(vp, S.vt + (int64_t)j * Dp, D, Dp);
            continue;
          }
#endif
          portable::load_row<T>(kp, S.kt + (int64_t)j * Dp, D, Dp);
          portable::load_row<T>(vp, S.vt + (int64_t)j * Dp, D, Dp);
        }
        if (nk16 > nk) std::memset(kt + (int64_t)nk * Dp, 0, sizeof(float) * (nk16 - nk) * Dp);
        const int r0 = gl * RG + q_first * G, r1 = (gl + 1) * RG;
        for (int r = r0; r < r1; ++r) {
          const int p = row_pos(r);
          S.nr[r] = (p + 1 - k0) < kTile ? (p + 1 - k0) : kTile;
        }
#if BI_X86
        if (kAvx) {
          avx::scores(S.qf, kt, r0, r1, nk, Dp, P.scale, S.s, S.Rs);
          avx::softmax_tile(S.s, S.Rs, r0, r1, S.nr, S.m, S.l, S.a);
          avx::pv(S.acc, S.s, S.Rs, S.a, S.nr, vt, r0, r1, Dp);
          continue;
        }
#endif
        portable::scores(S.qf, kt, r0, r1, nk, Dp, P.scale, S.s, S.Rs);
        portable::softmax_tile(S.s, S.Rs, r0, r1, S.nr, S.m, S.l, S.a);
        portable::pv(S.acc, S.s, S.Rs, S.a, S.nr, vt, r0, r1, Dp);
      }
    }
    // end of split s: rows whose position is >= ks have keys in it
    for (int r = 0; r < R; ++r) {
      if (row_pos(r) < ks) continue;
      const float* accr = S.acc + (int64_t)r * Dp;
      if (it.final_out) {
        combine_state<kAvx>(S.M[r], S.L[r], S.ACC + (int64_t)r * Dp, S.m[r], S.l[r], accr, Dp);
      } else {
        float* dst = P.part + (((int64_t)row_tok(r) * P.Hq + row_head(r)) * P.nsplit_max + s) * (Dp + 2);
        dst[0] = S.m[r];
        dst[1] = S.l[r];
        std::memcpy(dst + 2, accr, sizeof(float) * Dp);
      }
    }
  }
  if (it.final_out) {
    for (int r = 0; r < R; ++r) {
      finalize_row<T, kAvx>(S.ACC + (int64_t)r * Dp, S.L[r],
                            P.out + (int64_t)row_tok(r) * P.o_st + (int64_t)row_head(r) * P.o_sh, D);
      if (P.lse) P.lse[(int64_t)row_tok(r) * P.lse_st + row_head(r)] = lse_of(S.M[r], S.L[r]);
    }
  }
}

// Split-parallel mode, second pass: combine the partial states of token t (position p), head h,
// splits 0..p/512 in order, and write the output row. ACC: scratch of Dp floats.
template <typename T, bool kAvx>
void combine_partials(const Problem<T>& P, int t, int h, int p, float* ACC) {
  const int Dp = P.Dp;
  float M = kNegInf, L = 0.0f;
  std::memset(ACC, 0, sizeof(float) * Dp);
  const int ns = p / kSplit + 1;
  for (int s = 0; s < ns; ++s) {
    const float* src = P.part + (((int64_t)t * P.Hq + h) * P.nsplit_max + s) * (Dp + 2);
    combine_state<kAvx>(M, L, ACC, src[0], src[1], src + 2, Dp);
  }
  finalize_row<T, kAvx>(ACC, L, P.out + (int64_t)t * P.o_st + (int64_t)h * P.o_sh, P.D);
  if (P.lse) P.lse[(int64_t)t * P.lse_st + h] = lse_of(M, L);
}

}  // namespace attn
}  // namespace cpu
}  // namespace bi
