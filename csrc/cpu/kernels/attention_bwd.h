// Deterministic backward of the batch-invariant paged attention (kernels/attention.h):
// FlashAttention-2 style recomputation, no O(N^2) buffers, no atomics, two passes.
//
// Notation: fscale = fp32(scale); row (t, h) = query token t, head h at absolute position p; its
// kv head g = h / G (G = Hq / Hk); visible keys j = 0..p (logical positions of its sequence).
// dot(x, y) below is the contract lane structure: 16 fp32 lanes, lane l accumulates
// d = 16c + l (c ascending) as lane = fma(x[d], y[d], lane) from +0, dims D..Dp-1 padded with
// +0 * +0, then the lane tree (8, 4, 2, 1). All inputs are converted to fp32 exactly.
//
//   Delta(t,h)  = dot(dO(t,h), O(t,h))              O = the rounded forward output, as given
//   s_j         = dot(q(t,h), k_j) * fscale          (bitwise the forward's score)
//   P_j         = exp_f32(s_j - lse(t,h))            lse as given (attention_with_lse)
//   dP_j        = dot(dO(t,h), v_j)
//   dS_j        = P_j * (dP_j - Delta(t,h))          (fp32 subtract, then multiply)
//
// All gradient sums are two-level (fixed, position-defined blocks; the long sequential chains of a
// flat sum were ~5x less accurate than torch's blocked GEMMs in fp32):
// Pass 1 (independent rows (t, h)): per key tile t (keys [32t, 32t+32), the forward's tiles),
//   part[d] = +0; part[d] = fma(dS_j, k_j[d], part[d]) for the tile's keys j <= p ascending;
//   acc[d] = +0; acc[d] = acc[d] + part[d] for tiles t = 0..p/32 ascending;
//   grad_q(t,h)[d] = round(acc[d] * fscale)
// Pass 2 (independent keys: sequence b, kv head g, logical key j of b): the visible rows of b
// (query positions p_i >= j) are cut into query chunks by absolute position, chunk c = positions
// [c*QC, (c+1)*QC), QC = max(1, 64 / G). Per chunk, in the order (query i ascending, then
// h = g*G .. g*G+G-1 ascending):
//   pk[d] = +0; pk[d] = fma(dS_ij, q(i,h)[d], pk[d]);   pv[d] = +0; pv[d] = fma(P_ij, dO(i,h)[d], pv[d])
// and ak[d] = ak[d] + pk[d], av[d] = av[d] + pv[d] (from +0, chunks ascending).
//   A slot referenced by exactly one (sequence, logical position): grad_k = round(ak * fscale),
//   grad_v = round(av * 1.0f). A slot referenced by several (shared blocks): the per-reference fp32
//   sums (ak_1, ak_2, ...) ordered by (sequence b, logical position) ascending are added
//   sequentially in fp32: tk = ak_1; tk = tk + ak_2; ...; grad_k = round(tk * fscale) (same for v).
//   Slots not referenced by any sequence with queries: 0.
// Pairs outside the causal mask are skipped (not multiplied by 0). Everything is a function of the
// row's / key's own inputs and positions: no dependence on the tiling, thread count or item split.
// The portable path performs the same IEEE operations in the same order (std::fma where the
// vector code uses fma; exp_f32 == exp_f32_v), so it gives the same bits as the AVX-512 path.
#pragma once

#include <cstdint>
#include <cstring>

#include "attention.h"

namespace bi {
namespace cpu {
namespace attn_bwd {

using attn::kTile;

template <typename T>
struct Problem {
  const T* q; int64_t q_st, q_sh;            // [T, Hq, D]
  const T* dout; int64_t do_st, do_sh;       // grad_out [T, Hq, D]
  const T* out; int64_t o_st, o_sh;          // forward output [T, Hq, D]
  const float* lse; int64_t lse_st, lse_sh;  // [T, Hq]
  const T* kc; int64_t kc_sb, kc_ss, kc_sh;  // key_cache[blk, off, g, d]
  const T* vc; int64_t vc_sb, vc_ss, vc_sh;
  const int32_t* qsl;
  const int32_t* seq_lens;
  const int32_t* bt; int64_t bt_s;
  int Hq, Hk, D, Dp, block_size;
  float scale;
  T* dq; int64_t dq_st, dq_sh;                 // grad_q [T, Hq, D]
  T* dkc; int64_t dkc_sb, dkc_ss, dkc_sh;      // grad caches, cache layout
  T* dvc; int64_t dvc_sb, dvc_ss, dvc_sh;
  float* delta;  // [T * Hq]: written by pass 1, read by pass 2
  // Shared blocks (nullptr when no cache block is referenced twice): ref_id[ref_base[b] + lb] is the
  // reference index of (sequence b, logical block lb), or -1 when the block is not shared; partial
  // sums go to part_k / part_v [(ref * Hk + g) * block_size + off][Dp].
  const int64_t* ref_base = nullptr;
  const int32_t* ref_id = nullptr;
  float* part_k = nullptr;
  float* part_v = nullptr;
};

struct Item1 { int b, g, qi0, qi1; };  // pass 1: rows of queries [qi0, qi1) x heads of kv head g
struct Item2 { int b, g, tile; };      // pass 2: keys [32*tile, 32*tile + 32) of sequence b, kv head g

// Scratch for R rows (rows = queries x G heads of one item / row block).
static inline int64_t scratch_floats(int64_t R, int64_t Dp) {
  const int64_t Rs = attn::row_stride(R);
  return Rs * Dp * 3 + 2 * kTile * Rs + 2 * Rs + 4 * kTile * Dp + 64;
}
struct Scratch {
  float *qf, *dof, *dQ, *s, *dp, *lse, *delta, *kt, *vt, *dK, *dV;
  int *nr, *lo, *hi;  // nr: Rs ints; lo, hi: max(Rs, kTile) ints each
  int Rs;
  static int64_t ints(int64_t R) {
    const int64_t Rs = attn::row_stride(R);
    return Rs + 2 * (Rs > kTile ? Rs : kTile);
  }
  static Scratch carve(float* base, int* ibase, int64_t R, int64_t Dp) {
    Scratch S;
    const int64_t Rs = attn::row_stride(R);
    S.Rs = int(Rs);
    float* p = base;
    S.qf = p; p += Rs * Dp;
    S.dof = p; p += Rs * Dp;
    S.dQ = p; p += Rs * Dp;
    S.s = p; p += kTile * Rs;
    S.dp = p; p += kTile * Rs;
    S.lse = p; p += Rs;
    S.delta = p; p += Rs;
    S.kt = p; p += kTile * Dp;
    S.vt = p; p += kTile * Dp;
    S.dK = p; p += kTile * Dp;
    S.dV = p; p += kTile * Dp;
    const int64_t L = Rs > kTile ? Rs : kTile;
    S.nr = ibase;
    S.lo = ibase + Rs;
    S.hi = ibase + Rs + L;
    return S;
  }
};

// ================================================================================================
// Portable building blocks.
namespace portable {

// dot with the lane structure over Dp (both rows padded with +0 to Dp).
static inline float dot_lanes(const float* x, const float* y, int Dp) {
  float lanes[kLanes];
  for (int i = 0; i < kLanes; ++i) lanes[i] = 0.0f;
  for (int c = 0; c < Dp; c += kLanes)
    for (int i = 0; i < kLanes; ++i) lanes[i] = std::fma(x[c + i], y[c + i], lanes[i]);
  return tree_reduce16(lanes);
}

// S[j*Rs + r] (scores) -> P, dP[j*Rs + r] -> dS, for rows [r0, r1), keys j < nr[r].
static inline void probs(float* S, float* dP, int Rs, int r0, int r1, const int* nr, const float* lse,
                         const float* delta) {
  for (int r = r0; r < r1; ++r)
    for (int j = 0; j < nr[r]; ++j) {
      const float p = exp_f32(S[j * Rs + r] - lse[r]);
      const float t = dP[j * Rs + r] - delta[r];
      S[j * Rs + r] = p;
      dP[j * Rs + r] = p * t;
    }
}

// Two-level sum: for rows k in [k0, k1): part = +0; part = fma(coef[i*ci + k*ck], src[i][d], part)
// for i in [lo[k], hi[k]) ascending; then out[k][d] = out[k][d] + part.
static inline void accum(float* out, const float* coef, int64_t ci, int64_t ck, const float* src,
                         const int* lo, const int* hi, int k0, int k1, int Dp) {
  for (int k = k0; k < k1; ++k) {
    float* o = out + (int64_t)k * Dp;
    for (int d = 0; d < Dp; ++d) {
      float part = 0.0f;
      for (int i = lo[k]; i < hi[k]; ++i) part = std::fma(coef[i * ci + k * ck], src[(int64_t)i * Dp + d], part);
      o[d] = o[d] + part;
    }
  }
}

// dst[d] = dst[d] + src[d]
static inline void add_row(float* dst, const float* src, int Dp) {
  for (int d = 0; d < Dp; ++d) dst[d] = dst[d] + src[d];
}

// out[d] = round(acc[d] * mul), d < D
template <typename T>
static inline void store_row(const float* acc, float mul, T* out, int D) {
  for (int d = 0; d < D; ++d) out[d] = from_f32<T>(acc[d] * mul);
}

}  // namespace portable

// ================================================================================================
// AVX-512 building blocks (same operations).
#if BI_X86
namespace avx {

BI_AVX512 static inline float dot_lanes(const float* x, const float* y, int Dp) {
  __m512 a = _mm512_setzero_ps();
  for (int c = 0; c < Dp; c += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(x + c), _mm512_loadu_ps(y + c), a);
  return tree_reduce16_v(a);
}

BI_AVX512 static inline void probs(float* S, float* dP, int Rs, int r0, int r1, const int* nr,
                                   const float* lse, const float* delta) {
  for (int rc = r0 & ~15; rc < r1; rc += 16) {
    const int lo = rc > r0 ? rc : r0, hi = rc + 16 < r1 ? rc + 16 : r1;
    const __mmask16 act = __mmask16(((1u << (hi - rc)) - 1u) & ~((1u << (lo - rc)) - 1u));
    const __m512i n = _mm512_maskz_loadu_epi32(act, nr + rc);
    int nmax = 0;
    for (int r = lo; r < hi; ++r) nmax = nr[r] > nmax ? nr[r] : nmax;
    const __m512 lv = _mm512_maskz_loadu_ps(act, lse + rc);
    const __m512 dv = _mm512_maskz_loadu_ps(act, delta + rc);
    for (int j = 0; j < nmax; ++j) {
      const __mmask16 mj = _mm512_mask_cmpgt_epi32_mask(act, n, _mm512_set1_epi32(j));
      const __m512 p = exp_f32_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mj, S + j * Rs + rc), lv));
      const __m512 t = _mm512_sub_ps(_mm512_maskz_loadu_ps(mj, dP + j * Rs + rc), dv);
      _mm512_mask_storeu_ps(S + j * Rs + rc, mj, p);
      _mm512_mask_storeu_ps(dP + j * Rs + rc, mj, _mm512_mul_ps(p, t));
    }
  }
}

// KB output rows x DC vectors of 16 columns, starting at row k0, column c0 (two-level sum as
// portable::accum: register partials from +0, then one add into out).
template <int KB, int DC>
BI_AVX512 static inline void accum_mk(float* out, const float* coef, int64_t ci, int64_t ck, const float* src,
                                      const int* lo, const int* hi, int k0, int c0, int Dp) {
  __m512 acc[KB][DC];
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < DC; ++v) acc[k][v] = _mm512_setzero_ps();
  int ilo = lo[k0], ihi = hi[k0], flo = lo[k0], fhi = hi[k0];
  for (int k = 1; k < KB; ++k) {
    const int l = lo[k0 + k], h = hi[k0 + k];
    ilo = l < ilo ? l : ilo;
    flo = l > flo ? l : flo;
    ihi = h > ihi ? h : ihi;
    fhi = h < fhi ? h : fhi;
  }
  for (int i = ilo; i < ihi; ++i) {
    __m512 s[DC];
    for (int v = 0; v < DC; ++v) s[v] = _mm512_loadu_ps(src + (int64_t)i * Dp + c0 + 16 * v);
    const float* cp = coef + i * ci + k0 * ck;
    if (i >= flo && i < fhi) {
      for (int k = 0; k < KB; ++k) {
        const __m512 c = _mm512_set1_ps(cp[k * ck]);
        for (int v = 0; v < DC; ++v) acc[k][v] = _mm512_fmadd_ps(c, s[v], acc[k][v]);
      }
    } else {
      for (int k = 0; k < KB; ++k) {
        if (i < lo[k0 + k] || i >= hi[k0 + k]) continue;
        const __m512 c = _mm512_set1_ps(cp[k * ck]);
        for (int v = 0; v < DC; ++v) acc[k][v] = _mm512_fmadd_ps(c, s[v], acc[k][v]);
      }
    }
  }
  for (int k = 0; k < KB; ++k)
    for (int v = 0; v < DC; ++v) {
      float* o = out + (int64_t)(k0 + k) * Dp + c0 + 16 * v;
      _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[k][v]));
    }
}

template <int KB>
BI_AVX512 static inline void accum_rows(float* out, const float* coef, int64_t ci, int64_t ck, const float* src,
                                        const int* lo, const int* hi, int k0, int Dp) {
  int c = 0;
  for (; c + 64 <= Dp; c += 64) accum_mk<KB, 4>(out, coef, ci, ck, src, lo, hi, k0, c, Dp);
  switch ((Dp - c) / 16) {
    case 3: accum_mk<KB, 3>(out, coef, ci, ck, src, lo, hi, k0, c, Dp); break;
    case 2: accum_mk<KB, 2>(out, coef, ci, ck, src, lo, hi, k0, c, Dp); break;
    case 1: accum_mk<KB, 1>(out, coef, ci, ck, src, lo, hi, k0, c, Dp); break;
    default: break;
  }
}

BI_AVX512 static inline void accum(float* out, const float* coef, int64_t ci, int64_t ck, const float* src,
                                   const int* lo, const int* hi, int k0, int k1, int Dp) {
  int k = k0;
  for (; k + 4 <= k1; k += 4) accum_rows<4>(out, coef, ci, ck, src, lo, hi, k, Dp);
  for (; k < k1; ++k) accum_rows<1>(out, coef, ci, ck, src, lo, hi, k, Dp);
}

BI_AVX512 static inline void add_row(float* dst, const float* src, int Dp) {
  for (int d = 0; d < Dp; d += 16)
    _mm512_storeu_ps(dst + d, _mm512_add_ps(_mm512_loadu_ps(dst + d), _mm512_loadu_ps(src + d)));
}

template <typename T>
BI_AVX512 static inline void store_row(const float* acc, float mul, T* out, int D) {
  const __m512 m = _mm512_set1_ps(mul);
  for (int d = 0; d < D; d += 16)
    store16(out + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), m), tail_mask(D - d));
}

}  // namespace avx
#endif  // BI_X86

// ================================================================================================
// Dispatch helpers.
template <typename T, bool kAvx>
static inline void load_row(const T* src, float* dst, int D, int Dp) {
#if BI_X86
  if (kAvx) { attn::avx::load_row<T>(src, dst, D, Dp); return; }
#endif
  attn::portable::load_row<T>(src, dst, D, Dp);
}
template <bool kAvx>
static inline float dot_lanes(const float* x, const float* y, int Dp) {
#if BI_X86
  if (kAvx) return avx::dot_lanes(x, y, Dp);
#endif
  return portable::dot_lanes(x, y, Dp);
}
// S <- scores(qf, kt) * scale; dP <- dot(dof, vt); then S <- P, dP <- dS (rows [r0, r1)).
template <bool kAvx>
static inline void tile_probs(const Scratch& S, int r0, int r1, int nk, int Dp, float scale) {
#if BI_X86
  if (kAvx) {
    attn::avx::scores(S.qf, S.kt, r0, r1, nk, Dp, scale, S.s, S.Rs);
    attn::avx::scores(S.dof, S.vt, r0, r1, nk, Dp, 1.0f, S.dp, S.Rs);
    avx::probs(S.s, S.dp, S.Rs, r0, r1, S.nr, S.lse, S.delta);
    return;
  }
#endif
  attn::portable::scores(S.qf, S.kt, r0, r1, nk, Dp, scale, S.s, S.Rs);
  attn::portable::scores(S.dof, S.vt, r0, r1, nk, Dp, 1.0f, S.dp, S.Rs);
  portable::probs(S.s, S.dp, S.Rs, r0, r1, S.nr, S.lse, S.delta);
}
template <bool kAvx>
static inline void accum(float* out, const float* coef, int64_t ci, int64_t ck, const float* src, const int* lo,
                         const int* hi, int k0, int k1, int Dp) {
#if BI_X86
  if (kAvx) { avx::accum(out, coef, ci, ck, src, lo, hi, k0, k1, Dp); return; }
#endif
  portable::accum(out, coef, ci, ck, src, lo, hi, k0, k1, Dp);
}
template <typename T, bool kAvx>
static inline void store_row(const float* acc, float mul, T* out, int D) {
#if BI_X86
  if (kAvx) { avx::store_row<T>(acc, mul, out, D); return; }
#endif
  portable::store_row<T>(acc, mul, out, D);
}
template <bool kAvx>
static inline void add_row(float* dst, const float* src, int Dp) {
#if BI_X86
  if (kAvx) { avx::add_row(dst, src, Dp); return; }
#endif
  portable::add_row(dst, src, Dp);
}

// Gather + convert keys [k0, k0 + nk) of kv head g of sequence b into S.kt / S.vt (rows padded to
// a multiple of 16 with zeros).
template <typename T, bool kAvx>
static inline void load_kv_tile(const Problem<T>& P, const int32_t* bt, int g, int k0, int nk, const Scratch& S) {
  const int Dp = P.Dp;
  for (int j = 0; j < nk; ++j) {
    const int pos = k0 + j;
    const int64_t blk = bt[pos / P.block_size];
    const int64_t off = pos % P.block_size;
    load_row<T, kAvx>(P.kc + blk * P.kc_sb + off * P.kc_ss + (int64_t)g * P.kc_sh, S.kt + (int64_t)j * Dp, P.D, Dp);
    load_row<T, kAvx>(P.vc + blk * P.vc_sb + off * P.vc_ss + (int64_t)g * P.vc_sh, S.vt + (int64_t)j * Dp, P.D, Dp);
  }
  const int nk16 = (nk + 15) & ~15;
  if (nk16 > nk) {
    std::memset(S.kt + (int64_t)nk * Dp, 0, sizeof(float) * (nk16 - nk) * Dp);
    std::memset(S.vt + (int64_t)nk * Dp, 0, sizeof(float) * (nk16 - nk) * Dp);
  }
}

// ================================================================================================
// Pass 1: grad_q of rows (queries [qi0, qi1) of sequence b) x (heads of kv head g); also writes
// Delta of these rows to P.delta. Rows r = (qi - qi0) * G + hh.
template <typename T, bool kAvx>
void pass1_item(const Problem<T>& P, const Item1& it, const Scratch& S) {
  const int G = P.Hq / P.Hk, Dp = P.Dp, D = P.D;
  const int t0 = P.qsl[it.b], qlen = P.qsl[it.b + 1] - t0, ctx = P.seq_lens[it.b];
  const int nq = it.qi1 - it.qi0, R = nq * G;
  const int pmin = ctx - qlen + it.qi0, pmax = pmin + nq - 1;
  const int32_t* bt = P.bt + (int64_t)it.b * P.bt_s;
  for (int r = 0; r < R; ++r) {
    const int t = t0 + it.qi0 + r / G, h = it.g * G + r % G;
    float* qr = S.qf + (int64_t)r * Dp;
    float* dr = S.dof + (int64_t)r * Dp;
    load_row<T, kAvx>(P.q + (int64_t)t * P.q_st + (int64_t)h * P.q_sh, qr, D, Dp);
    load_row<T, kAvx>(P.dout + (int64_t)t * P.do_st + (int64_t)h * P.do_sh, dr, D, Dp);
    float* orow = S.dQ + (int64_t)r * Dp;  // temporarily O, before dQ is cleared
    load_row<T, kAvx>(P.out + (int64_t)t * P.o_st + (int64_t)h * P.o_sh, orow, D, Dp);
    const float dl = dot_lanes<kAvx>(dr, orow, Dp);
    S.delta[r] = dl;
    P.delta[(int64_t)t * P.Hq + h] = dl;
    S.lse[r] = P.lse[(int64_t)t * P.lse_st + (int64_t)h * P.lse_sh];
    S.lo[r] = 0;
  }
  std::memset(S.dQ, 0, sizeof(float) * R * Dp);
  const int ntiles = pmax / kTile + 1;
  for (int tile = 0; tile < ntiles; ++tile) {
    const int k0 = tile * kTile;
    const int nk = (pmax + 1 - k0) < kTile ? (pmax + 1 - k0) : kTile;
    const int q_first = k0 > pmin ? k0 - pmin : 0;
    const int r0 = q_first * G;
    load_kv_tile<T, kAvx>(P, bt, it.g, k0, nk, S);
    for (int r = r0; r < R; ++r) {
      const int p = pmin + r / G;
      S.nr[r] = (p + 1 - k0) < kTile ? (p + 1 - k0) : kTile;
    }
    tile_probs<kAvx>(S, r0, R, nk, Dp, P.scale);
    // dQ[r] += dS[j][r] * k_j, j in [0, nr[r]) ascending
    accum<kAvx>(S.dQ, S.dp, S.Rs, 1, S.kt, S.lo, S.nr, r0, R, Dp);
  }
  for (int r = 0; r < R; ++r) {
    const int t = t0 + it.qi0 + r / G, h = it.g * G + r % G;
    store_row<T, kAvx>(S.dQ + (int64_t)r * Dp, P.scale, P.dq + (int64_t)t * P.dq_st + (int64_t)h * P.dq_sh, D);
  }
}

// ================================================================================================
// Pass 2: grad_k / grad_v of keys [32*tile, 32*tile + nk) of sequence b, kv head g. Visible rows are
// processed chunk by chunk (chunk = queries at absolute positions [c*qb, (c+1)*qb), c ascending);
// per chunk a fresh fp32 partial (fma chain over query asc, head asc) is added to the totals dK / dV.
template <typename T, bool kAvx>
void pass2_item(const Problem<T>& P, const Item2& it, int qb, const Scratch& S) {
  const int G = P.Hq / P.Hk, Dp = P.Dp, D = P.D;
  const int t0 = P.qsl[it.b], qlen = P.qsl[it.b + 1] - t0, ctx = P.seq_lens[it.b];
  const int pstart = ctx - qlen;
  const int k0 = it.tile * kTile;
  const int nk = (ctx - k0) < kTile ? (ctx - k0) : kTile;
  const int32_t* bt = P.bt + (int64_t)it.b * P.bt_s;
  load_kv_tile<T, kAvx>(P, bt, it.g, k0, nk, S);
  std::memset(S.dK, 0, sizeof(float) * kTile * Dp);
  std::memset(S.dV, 0, sizeof(float) * kTile * Dp);
  const int qi_first = k0 > pstart ? k0 - pstart : 0;
  for (int qa = qi_first; qa < qlen;) {
    // query chunk: absolute positions [c*qb, (c+1)*qb), c = (pstart + qa) / qb
    const int cend = ((pstart + qa) / qb + 1) * qb - pstart;
    const int qe = cend < qlen ? cend : qlen;
    const int R = (qe - qa) * G;
    for (int r = 0; r < R; ++r) {
      const int qi = qa + r / G;
      const int t = t0 + qi, h = it.g * G + r % G;
      load_row<T, kAvx>(P.q + (int64_t)t * P.q_st + (int64_t)h * P.q_sh, S.qf + (int64_t)r * Dp, D, Dp);
      load_row<T, kAvx>(P.dout + (int64_t)t * P.do_st + (int64_t)h * P.do_sh, S.dof + (int64_t)r * Dp, D, Dp);
      S.lse[r] = P.lse[(int64_t)t * P.lse_st + (int64_t)h * P.lse_sh];
      S.delta[r] = P.delta[(int64_t)t * P.Hq + h];
      const int p = pstart + qi;
      S.nr[r] = (p + 1 - k0) < nk ? (p + 1 - k0) : nk;
    }
    tile_probs<kAvx>(S, 0, R, nk, Dp, P.scale);
    // key j takes rows r with nr[r] > j (a suffix of the block: nr is nondecreasing in r)
    int r = 0;
    for (int j = 0; j < nk; ++j) {
      while (r < R && S.nr[r] <= j) ++r;
      S.lo[j] = r;
      S.hi[j] = R;
    }
    // dK[j] += dS[j][r] * q_r,  dV[j] += P[j][r] * dO_r,  r ascending
    accum<kAvx>(S.dK, S.dp, 1, S.Rs, S.qf, S.lo, S.hi, 0, nk, Dp);
    accum<kAvx>(S.dV, S.s, 1, S.Rs, S.dof, S.lo, S.hi, 0, nk, Dp);
    qa = qe;
  }
  for (int j = 0; j < nk; ++j) {
    const int pos = k0 + j;
    const int lb = pos / P.block_size;
    const int64_t off = pos % P.block_size;
    const int32_t ref = P.ref_base ? P.ref_id[P.ref_base[it.b] + lb] : -1;
    if (ref >= 0) {  // shared block: keep the fp32 partial sums, combined by finish_shared()
      const int64_t row = ((int64_t)ref * P.Hk + it.g) * P.block_size + off;
      std::memcpy(P.part_k + row * Dp, S.dK + (int64_t)j * Dp, sizeof(float) * Dp);
      std::memcpy(P.part_v + row * Dp, S.dV + (int64_t)j * Dp, sizeof(float) * Dp);
      continue;
    }
    const int64_t blk = bt[lb];
    store_row<T, kAvx>(S.dK + (int64_t)j * Dp, P.scale, P.dkc + blk * P.dkc_sb + off * P.dkc_ss + (int64_t)it.g * P.dkc_sh, D);
    store_row<T, kAvx>(S.dV + (int64_t)j * Dp, 1.0f, P.dvc + blk * P.dvc_sb + off * P.dvc_ss + (int64_t)it.g * P.dvc_sh, D);
  }
}

// Shared block blk, kv head g: refs[0..nref) (ascending = (sequence, logical block) ascending) and
// the number of valid offsets of each reference. tmp: 2 * Dp floats.
template <typename T, bool kAvx>
void finish_shared(const Problem<T>& P, int64_t blk, int g, const int32_t* refs, const int32_t* ncov, int nref,
                   float* tmp) {
  const int Dp = P.Dp;
  float* tk = tmp;
  float* tv = tmp + Dp;
  for (int off = 0; off < P.block_size; ++off) {
    bool any = false;
    for (int i = 0; i < nref; ++i) {
      if (off >= ncov[i]) continue;
      const int64_t row = ((int64_t)refs[i] * P.Hk + g) * P.block_size + off;
      if (!any) {
        std::memcpy(tk, P.part_k + row * Dp, sizeof(float) * Dp);
        std::memcpy(tv, P.part_v + row * Dp, sizeof(float) * Dp);
        any = true;
      } else {
        add_row<kAvx>(tk, P.part_k + row * Dp, Dp);
        add_row<kAvx>(tv, P.part_v + row * Dp, Dp);
      }
    }
    if (!any) continue;  // slot not referenced: stays 0
    store_row<T, kAvx>(tk, P.scale, P.dkc + blk * P.dkc_sb + off * P.dkc_ss + (int64_t)g * P.dkc_sh, P.D);
    store_row<T, kAvx>(tv, 1.0f, P.dvc + blk * P.dvc_sb + off * P.dvc_ss + (int64_t)g * P.dvc_sh, P.D);
  }
}

}  // namespace attn_bwd
}  // namespace cpu
}  // namespace bi
