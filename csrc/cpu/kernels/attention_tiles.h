// Attention tile building blocks (scores of a query-row block against a key tile, the online-
// softmax tile update, P.V, split combine): a portable scalar set and an AVX-512 set doing the
// same IEEE operations in the same order. Included by attention.h (forward) and attention_bwd.h.
// Framework-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common.h"

namespace bi {
namespace cpu {
namespace attn {

constexpr int kTile = contract::ATTN_TILE_N;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ================================================================================================
// Portable building blocks (scalar; the same IEEE operations as the AVX-512 ones below).
namespace portable {

template <typename T>
static inline void load_row(const T* src, float* dst, int D, int Dp) {
  for (int d = 0; d < D; ++d) dst[d] = to_f32<T>(src[d]);
  for (int d = D; d < Dp; ++d) dst[d] = 0.0f;
}

// S[r*32 + j] for rows [r0, r1), keys j < nk (tile buffer kt holds keys as padded fp32 rows).
static inline void scores(const float* qf, const float* kt, int r0, int r1, int nk, int Dp,
                          float scale, float* S, int Rs) {
  for (int r = r0; r < r1; ++r) {
    const float* q = qf + (int64_t)r * Dp;
    for (int j = 0; j < nk; ++j) {
      const float* k = kt + (int64_t)j * Dp;
      float lanes[kLanes];
      for (int i = 0; i < kLanes; ++i) lanes[i] = 0.0f;
      for (int c = 0; c < Dp; c += kLanes)
        for (int i = 0; i < kLanes; ++i) lanes[i] = std::fma(q[c + i], k[c + i], lanes[i]);
      S[j * Rs + r] = tree_reduce16(lanes) * scale;
    }
  }
}

// Online-softmax step for rows [r0, r1): s (scores -> probabilities), m, l updated, a = rescale.
static inline void softmax_tile(float* S, int Rs, int r0, int r1, const int* nr, float* m, float* l,
                                float* a) {
  for (int r = r0; r < r1; ++r) {
    const int n = nr[r];
    float mt = S[r];
    for (int j = 1; j < n; ++j) mt = S[j * Rs + r] > mt ? S[j * Rs + r] : mt;
    const float mo = m[r];
    const float mn = mt > mo ? mt : mo;
    const float ar = (mo == kNegInf) ? 0.0f : exp_f32(mo - mn);
    float lr = l[r] * ar;
    for (int j = 0; j < n; ++j) {
      const float pj = exp_f32(S[j * Rs + r] - mn);
      S[j * Rs + r] = pj;
      lr = lr + pj;
    }
    m[r] = mn;
    l[r] = lr;
    a[r] = ar;
  }
}

// acc[r] = acc[r]*a[r], then acc[r] = fma(p_j, v_j, acc[r]) for j < nr[r].
static inline void pv(float* acc, const float* P, int Rs, const float* a, const int* nr,
                      const float* vt, int r0, int r1, int Dp) {
  for (int r = r0; r < r1; ++r) {
    float* ac = acc + (int64_t)r * Dp;
    const float ar = a[r];
    for (int d = 0; d < Dp; ++d) ac[d] = ac[d] * ar;
    for (int j = 0; j < nr[r]; ++j) {
      const float pj = P[j * Rs + r];
      const float* v = vt + (int64_t)j * Dp;
      for (int d = 0; d < Dp; ++d) ac[d] = std::fma(pj, v[d], ac[d]);
    }
  }
}

static inline void combine(float* ACC, const float* acc, float e1, float e2, int Dp) {
  for (int d = 0; d < Dp; ++d) {
    float x = ACC[d] * e1;
    float y = acc[d] * e2;
    ACC[d] = x + y;
  }
}

template <typename T>
static inline void finalize(const float* ACC, float L, T* out, int D) {
  for (int d = 0; d < D; ++d) out[d] = from_f32<T>(ACC[d] / L);
}

}  // namespace portable

// ================================================================================================
// AVX-512 building blocks.
#if BI_X86
namespace avx {

template <typename T>
BI_AVX512 static inline void load_row(const T* src, float* dst, int D, int Dp) {
  for (int c = 0; c < Dp; c += 16) _mm512_storeu_ps(dst + c, load16(src + c, tail_mask(D - c)));
}

// The contract lane tree applied to 16 vectors at once (the same additions as tree_reduce16 for
// each vector). Step s=8: lanes i and i+8 of one vector, two vectors per result.
BI_AVX512 static inline __m512 tr8(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
BI_AVX512 static inline __m512 tr4(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
BI_AVX512 static inline __m512 tr2(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
}
BI_AVX512 static inline __m512 tr1(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD));
}

#define BI_ATTN_X16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)

// RB rows x KB keys (RB*KB == 16) of scores; accumulator i = r*KB + kk (named registers).
template <int RB, int KB>
BI_AVX512 static inline void scores_mk(const float* qf, const float* kt, int r0, int k0, int Dp,
                                       float scale, float* S, int Rs) {
  static_assert(RB * KB == 16, "16 accumulators");
  const float* q = qf + (int64_t)r0 * Dp;
  const float* k = kt + (int64_t)k0 * Dp;
#define BI_DECL(i) __m512 a##i = _mm512_setzero_ps();
  BI_ATTN_X16(BI_DECL)
#undef BI_DECL
  for (int c = 0; c < Dp; c += 16) {
#define BI_STEP(i)                                                                       \
  a##i = _mm512_fmadd_ps(_mm512_loadu_ps(q + (int64_t)((i) / KB) * Dp + c),            \
                         _mm512_loadu_ps(k + (int64_t)((i) % KB) * Dp + c), a##i);
    BI_ATTN_X16(BI_STEP)
#undef BI_STEP
  }
  const __m512 w0 = tr8(a0, a1), w1 = tr8(a2, a3), w2 = tr8(a4, a5), w3 = tr8(a6, a7);
  const __m512 w4 = tr8(a8, a9), w5 = tr8(a10, a11), w6 = tr8(a12, a13), w7 = tr8(a14, a15);
  const __m512 x0 = tr4(w0, w1), x1 = tr4(w2, w3), x2 = tr4(w4, w5), x3 = tr4(w6, w7);
  const __m512 y0 = tr2(x0, x1), y1 = tr2(x2, x3);
  // lane 4q + t of tr1(y0, y1) holds tree(a_{4t+q}); input i = r*KB + kk
  const __m512 z = _mm512_mul_ps(tr1(y0, y1), _mm512_set1_ps(scale));
  if (RB == 4) {  // lane 4*kk + r: 4 consecutive rows per key
    _mm_storeu_ps(S + (k0 + 0) * Rs + r0, _mm512_extractf32x4_ps(z, 0));
    _mm_storeu_ps(S + (k0 + 1) * Rs + r0, _mm512_extractf32x4_ps(z, 1));
    _mm_storeu_ps(S + (k0 + 2) * Rs + r0, _mm512_extractf32x4_ps(z, 2));
    _mm_storeu_ps(S + (k0 + 3) * Rs + r0, _mm512_extractf32x4_ps(z, 3));
  } else {
    alignas(64) float t[16];
    _mm512_store_ps(t, z);
    for (int r = 0; r < RB; ++r)
      for (int kk = 0; kk < KB; ++kk) {
        const int i = r * KB + kk;
        S[(k0 + kk) * Rs + r0 + r] = t[4 * (i % 4) + i / 4];
      }
  }
}
#undef BI_ATTN_X16

// kt rows [nk, round16(nk)) must be zero (the caller pads); extra scores are never used.
BI_AVX512 static inline void scores(const float* qf, const float* kt, int r0, int r1, int nk, int Dp,
                                    float scale, float* S, int Rs) {
  int r = r0;
  for (; r + 4 <= r1; r += 4)
    for (int k0 = 0; k0 < nk; k0 += 4) scores_mk<4, 4>(qf, kt, r, k0, Dp, scale, S, Rs);
  for (; r + 2 <= r1; r += 2)
    for (int k0 = 0; k0 < nk; k0 += 8) scores_mk<2, 8>(qf, kt, r, k0, Dp, scale, S, Rs);
  for (; r < r1; ++r)
    for (int k0 = 0; k0 < nk; k0 += 16) scores_mk<1, 16>(qf, kt, r, k0, Dp, scale, S, Rs);
}

// Same per-row operations as portable::softmax_tile, 16 rows per vector (max_ps(a, b) is
// a > b ? a : b, exactly the scalar expressions).
BI_AVX512 static inline void softmax_tile(float* S, int Rs, int r0, int r1, const int* nr, float* m,
                                          float* l, float* a) {
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  for (int rc = r0 & ~15; rc < r1; rc += 16) {
    const int lo = rc > r0 ? rc : r0, hi = rc + 16 < r1 ? rc + 16 : r1;
    const __mmask16 act = __mmask16(((1u << (hi - rc)) - 1u) & ~((1u << (lo - rc)) - 1u));
    const __m512i n = _mm512_maskz_loadu_epi32(act, nr + rc);
    const int nmax = nr[hi - 1];  // nr is nondecreasing in r
    __m512 mt = _mm512_maskz_loadu_ps(act, S + rc);
    for (int j = 1; j < nmax; ++j) {
      const __mmask16 mj = _mm512_mask_cmpgt_epi32_mask(act, n, _mm512_set1_epi32(j));
      mt = _mm512_mask_max_ps(mt, mj, _mm512_maskz_loadu_ps(mj, S + j * Rs + rc), mt);
    }
    const __m512 mo = _mm512_maskz_loadu_ps(act, m + rc);
    const __m512 mn = _mm512_max_ps(mt, mo);
    const __mmask16 first = _mm512_cmp_ps_mask(mo, ninf, _CMP_EQ_OQ);
    const __m512 av = _mm512_mask_mov_ps(exp_f32_v(_mm512_sub_ps(mo, mn)), first, _mm512_setzero_ps());
    __m512 lv = _mm512_mul_ps(_mm512_maskz_loadu_ps(act, l + rc), av);
    for (int j = 0; j < nmax; ++j) {
      const __mmask16 mj = _mm512_mask_cmpgt_epi32_mask(act, n, _mm512_set1_epi32(j));
      const __m512 p = exp_f32_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(mj, S + j * Rs + rc), mn));
      _mm512_mask_storeu_ps(S + j * Rs + rc, mj, p);
      lv = _mm512_mask_add_ps(lv, mj, lv, p);
    }
    _mm512_mask_storeu_ps(m + rc, act, mn);
    _mm512_mask_storeu_ps(l + rc, act, lv);
    _mm512_mask_storeu_ps(a + rc, act, av);
  }
}

template <int RB>
BI_AVX512 static inline void pv_mk(float* acc, const float* P, int Rs, const float* a, const int* nr,
                                   const float* vt, int r0, int Dp) {
  const int jmin = nr[r0], jmax = nr[r0 + RB - 1];  // nr is nondecreasing in r
  for (int c = 0; c < Dp; c += 16) {
    __m512 ac[RB];
    for (int r = 0; r < RB; ++r)
      ac[r] = _mm512_mul_ps(_mm512_loadu_ps(acc + (int64_t)(r0 + r) * Dp + c), _mm512_set1_ps(a[r0 + r]));
    int j = 0;
    for (; j < jmin; ++j) {
      __m512 v = _mm512_loadu_ps(vt + (int64_t)j * Dp + c);
      for (int r = 0; r < RB; ++r)
        ac[r] = _mm512_fmadd_ps(_mm512_set1_ps(P[j * Rs + r0 + r]), v, ac[r]);
    }
    for (; j < jmax; ++j) {
      __m512 v = _mm512_loadu_ps(vt + (int64_t)j * Dp + c);
      for (int r = 0; r < RB; ++r)
        if (j < nr[r0 + r]) ac[r] = _mm512_fmadd_ps(_mm512_set1_ps(P[j * Rs + r0 + r]), v, ac[r]);
    }
    for (int r = 0; r < RB; ++r) _mm512_storeu_ps(acc + (int64_t)(r0 + r) * Dp + c, ac[r]);
  }
}

BI_AVX512 static inline void pv(float* acc, const float* P, int Rs, const float* a, const int* nr,
                                const float* vt, int r0, int r1, int Dp) {
  int r = r0;
  for (; r + 8 <= r1; r += 8) pv_mk<8>(acc, P, Rs, a, nr, vt, r, Dp);
  if (r + 4 <= r1) { pv_mk<4>(acc, P, Rs, a, nr, vt, r, Dp); r += 4; }
  if (r + 2 <= r1) { pv_mk<2>(acc, P, Rs, a, nr, vt, r, Dp); r += 2; }
  if (r < r1) pv_mk<1>(acc, P, Rs, a, nr, vt, r, Dp);
}

BI_AVX512 static inline void combine(float* ACC, const float* acc, float e1, float e2, int Dp) {
  const __m512 v1 = _mm512_set1_ps(e1), v2 = _mm512_set1_ps(e2);
  for (int d = 0; d < Dp; d += 16) {
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(ACC + d), v1);
    __m512 y = _mm512_mul_ps(_mm512_loadu_ps(acc + d), v2);
    _mm512_storeu_ps(ACC + d, _mm512_add_ps(x, y));
  }
}

template <typename T>
BI_AVX512 static inline void finalize(const float* ACC, float L, T* out, int D) {
  const __m512 lv = _mm512_set1_ps(L);
  for (int d = 0; d < D; d += 16)
    store16(out + d, _mm512_div_ps(_mm512_loadu_ps(ACC + d), lv), tail_mask(D - d));
}

}  // namespace avx
#endif  // BI_X86

}  // namespace attn
}  // namespace cpu
}  // namespace bi
