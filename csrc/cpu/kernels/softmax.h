// Row-wise softmax family (framework-free). Per row z[0..V) (fp32 values of the input):
//   mx  = contract max: 16 fp32 lanes, lane l takes v = 16c + l (c ascending), acc_l starting at
//         -inf, acc_l = (acc_l > z ? acc_l : z) (= vmaxps(acc, z)), masked tail lanes are -inf;
//         then tree_max16 (fixed tree, (8,4,2,1)).
//   s   = contract sum of e_v = exp_f32(z_v - mx): lanes as above, acc_l starting at +0,
//         acc_l = acc_l + e_v, masked tail lanes add +0; then tree_reduce16.
//   log_softmax: out_v = round((z_v - mx) - logf(s))   (logf: the C library's, once per row)
//   softmax:     out_v = round(exp_f32(z_v - mx) / s)
//   row_mean:    round(sum / (float)V), sum = contract sum of z_v (acc_l = acc_l + z_v).
// An all -inf row gives mx = -inf, z - mx = NaN: NaN outputs (as torch). The portable path does
// the identical operation sequence (exp_f32 and exp_f32_v give the same bits).
#pragma once

#include <cmath>
#include <cstdint>

#include "../common.h"

namespace bi {
namespace cpu {
namespace kernels {

// ------------------------------------------------------------------------------------------
// Portable building blocks.
template <typename T>
static inline float row_max_portable(const T* x, int64_t V) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = -INFINITY;
  for (int64_t c0 = 0; c0 < V; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      int64_t v = c0 + l;
      float z = v < V ? to_f32(x[v]) : -INFINITY;
      acc[l] = acc[l] > z ? acc[l] : z;
    }
  return tree_max16(acc);
}

// Contract sum of exp(z - mx) over [c_begin, V), c_begin a multiple of 16 (lane = v % 16);
// callers pass c_begin > 0 only when every skipped element contributes exactly +0.
template <typename T>
static inline float row_sumexp_portable(const T* x, int64_t V, float mx, int64_t c_begin = 0) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t c0 = c_begin; c0 < V; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      int64_t v = c0 + l;
      float e = v < V ? exp_f32(to_f32(x[v]) - mx) : 0.0f;
      acc[l] = acc[l] + e;
    }
  return tree_reduce16(acc);
}

template <typename T>
static inline float row_sum_portable(const T* x, int64_t V) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t c0 = 0; c0 < V; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      int64_t v = c0 + l;
      float z = v < V ? to_f32(x[v]) : 0.0f;
      acc[l] = acc[l] + z;
    }
  return tree_reduce16(acc);
}

static inline float row_log(float s) { return std::log(s); }  // C library logf

template <typename T, typename O>
static inline void log_softmax_row_portable(const T* x, O* out, int64_t V) {
  const float mx = row_max_portable(x, V);
  const float lse = row_log(row_sumexp_portable(x, V, mx));
  for (int64_t v = 0; v < V; ++v) {
    float d = to_f32(x[v]) - mx;
    out[v] = from_f32<O>(d - lse);
  }
}

// softmax keeps e_v = exp_f32(z_v - mx) in an fp32 buffer `e` (may be `out` itself when O is
// float) between the sum and the division: the same values as recomputing them.
template <typename T, typename O>
static inline void softmax_row_portable(const T* x, O* out, float* e, int64_t V) {
  const float mx = row_max_portable(x, V);
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t c0 = 0; c0 < V; c0 += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      int64_t v = c0 + l;
      float ev = v < V ? exp_f32(to_f32(x[v]) - mx) : 0.0f;
      if (v < V) e[v] = ev;
      acc[l] = acc[l] + ev;
    }
  const float s = tree_reduce16(acc);
  for (int64_t v = 0; v < V; ++v) out[v] = from_f32<O>(e[v] / s);
}

template <typename T, typename O>
static inline void row_mean_portable(const T* x, O* out, int64_t V) {
  *out = from_f32<O>(row_sum_portable(x, V) / float(V));
}

// ------------------------------------------------------------------------------------------
// AVX-512 building blocks (same operation sequence).
#if BI_X86
template <typename T>
BI_AVX512 static inline float row_max_avx512(const T* x, int64_t V) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 acc = ninf;
  for (int64_t c0 = 0; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    __m512 z = _mm512_mask_mov_ps(ninf, m, load16(x + c0, m));
    acc = _mm512_max_ps(acc, z);  // (acc > z) ? acc : z
  }
  return tree_max16_v(acc);
}

template <typename T>
BI_AVX512 static inline float row_sumexp_avx512(const T* x, int64_t V, float mx, int64_t c_begin = 0) {
  const __m512 mxv = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c0 = c_begin; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    __m512 e = exp_f32_v(_mm512_sub_ps(load16(x + c0, m), mxv));
    acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
  }
  return tree_reduce16_v(acc);
}

template <typename T>
BI_AVX512 static inline float row_sum_avx512(const T* x, int64_t V) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    acc = _mm512_add_ps(acc, load16(x + c0, m));
  }
  return tree_reduce16_v(acc);
}

template <typename T, typename O>
BI_AVX512 static void log_softmax_row_avx512(const T* x, O* out, int64_t V) {
  const float mx = row_max_avx512(x, V);
  const float lse = row_log(row_sumexp_avx512(x, V, mx));
  const __m512 mxv = _mm512_set1_ps(mx), lsev = _mm512_set1_ps(lse);
  for (int64_t c0 = 0; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    __m512 d = _mm512_sub_ps(load16(x + c0, m), mxv);
    store16(out + c0, _mm512_sub_ps(d, lsev), m);
  }
}

template <typename T, typename O>
BI_AVX512 static void softmax_row_avx512(const T* x, O* out, float* e, int64_t V) {
  const float mx = row_max_avx512(x, V);
  const __m512 mxv = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    __m512 ev = _mm512_maskz_mov_ps(m, exp_f32_v(_mm512_sub_ps(load16(x + c0, m), mxv)));
    _mm512_mask_storeu_ps(e + c0, m, ev);
    acc = _mm512_add_ps(acc, ev);
  }
  const __m512 sv = _mm512_set1_ps(tree_reduce16_v(acc));
  for (int64_t c0 = 0; c0 < V; c0 += kLanes) {
    __mmask16 m = tail_mask(V - c0);
    store16(out + c0, _mm512_div_ps(_mm512_maskz_loadu_ps(m, e + c0), sv), m);
  }
}

template <typename T, typename O>
BI_AVX512 static void row_mean_avx512(const T* x, O* out, int64_t V) {
  *out = from_f32<O>(row_sum_avx512(x, V) / float(V));
}
#endif

// ------------------------------------------------------------------------------------------
// Row-range entry points: rows [r0, r1), x row t at x + t * x_stride (inner dim contiguous).
template <typename T, typename O>
void log_softmax_rows(const T* x, int64_t x_stride, O* out, int64_t out_stride, int64_t V,
                      int64_t r0, int64_t r1, bool avx512) {
#if BI_X86
  if (avx512) {
    for (int64_t t = r0; t < r1; ++t) log_softmax_row_avx512<T, O>(x + t * x_stride, out + t * out_stride, V);
    return;
  }
#endif
  (void)avx512;
  for (int64_t t = r0; t < r1; ++t) log_softmax_row_portable<T, O>(x + t * x_stride, out + t * out_stride, V);
}

// `scratch`: V floats per calling thread, used only when O is not float (else the output row is
// the buffer).
template <typename O> static inline float* softmax_ebuf(O*, float* scratch) { return scratch; }
static inline float* softmax_ebuf(float* out, float*) { return out; }

template <typename T, typename O>
void softmax_rows(const T* x, int64_t x_stride, O* out, int64_t out_stride, int64_t V, int64_t r0,
                  int64_t r1, bool avx512, float* scratch) {
#if BI_X86
  if (avx512) {
    for (int64_t t = r0; t < r1; ++t) {
      O* o = out + t * out_stride;
      softmax_row_avx512<T, O>(x + t * x_stride, o, softmax_ebuf(o, scratch), V);
    }
    return;
  }
#endif
  (void)avx512;
  for (int64_t t = r0; t < r1; ++t) {
    O* o = out + t * out_stride;
    softmax_row_portable<T, O>(x + t * x_stride, o, softmax_ebuf(o, scratch), V);
  }
}

// out[t] = mean of row t.
template <typename T, typename O>
void row_mean_rows(const T* x, int64_t x_stride, O* out, int64_t V, int64_t r0, int64_t r1, bool avx512) {
#if BI_X86
  if (avx512) {
    for (int64_t t = r0; t < r1; ++t) row_mean_avx512<T, O>(x + t * x_stride, out + t, V);
    return;
  }
#endif
  (void)avx512;
  for (int64_t t = r0; t < r1; ++t) row_mean_portable<T, O>(x + t * x_stride, out + t, V);
}

}  // namespace kernels
}  // namespace cpu
}  // namespace bi
