// RMSNorm kernels (framework-free). Per row of length H:
//   ss  = contract reduction of z*z: 16 fp32 lanes, lane l accumulates h = 16c + l (c ascending)
//         as acc_l = fma(z_h, z_h, acc_l) starting from +0 (masked tail lanes: fma(0, 0, acc) = acc),
//         then the contract's lane tree (tree_reduce16);
//   r   = 1.0f / sqrtf(ss / (float)H + eps)          (fp32, IEEE, these four operations in this order)
//   out = round_T((z * r) * w_f32)                   (two fp32 multiplies in this order, one rounding)
// fused_add: z = round_T(x + residual) is written to residual_out first; the norm reads the rounded z.
// The portable path performs the identical operation sequence (std::fma), so both give the same bits.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common.h"

namespace bi {
namespace cpu {
namespace kernels {

// The per-row scale; shared by both paths (scalar code, called once per row).
static inline float rms_scale(float ss, int64_t H, float eps) {
  float mean = ss / float(H);
  float d = mean + eps;
  float s = std::sqrt(d);
  return 1.0f / s;
}

// ------------------------------------------------------------------------------------------
// Portable path.
template <typename T, typename W>
static inline void rms_norm_row_portable(const T* x, const W* w, T* out, int64_t H, float eps) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t c0 = 0; c0 < H; c0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      int64_t h = c0 + l;
      float z = h < H ? to_f32(x[h]) : 0.0f;
      acc[l] = std::fma(z, z, acc[l]);
    }
  }
  const float r = rms_scale(tree_reduce16(acc), H, eps);
  for (int64_t h = 0; h < H; ++h) {
    float z = to_f32(x[h]);
    float y = z * r;
    y = y * to_f32(w[h]);
    out[h] = from_f32<T>(y);
  }
}

template <typename T>
static inline void add_round_row_portable(const T* x, const T* res, T* res_out, int64_t H) {
  for (int64_t h = 0; h < H; ++h) res_out[h] = from_f32<T>(to_f32(x[h]) + to_f32(res[h]));
}

// ------------------------------------------------------------------------------------------
// AVX-512 path (same operation sequence).
#if BI_X86
template <typename T, typename W>
BI_AVX512 static void rms_norm_row_avx512(const T* x, const W* w, T* out, int64_t H, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < H; c0 += kLanes) {
    __mmask16 m = tail_mask(H - c0);
    __m512 z = load16(x + c0, m);
    acc = _mm512_fmadd_ps(z, z, acc);
  }
  const float r = rms_scale(tree_reduce16_v(acc), H, eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t c0 = 0; c0 < H; c0 += kLanes) {
    __mmask16 m = tail_mask(H - c0);
    __m512 z = load16(x + c0, m);
    __m512 y = _mm512_mul_ps(z, rv);
    y = _mm512_mul_ps(y, load16(w + c0, m));
    store16(out + c0, y, m);
  }
}

template <typename T>
BI_AVX512 static void add_round_row_avx512(const T* x, const T* res, T* res_out, int64_t H) {
  for (int64_t c0 = 0; c0 < H; c0 += kLanes) {
    __mmask16 m = tail_mask(H - c0);
    store16(res_out + c0, _mm512_add_ps(load16(x + c0, m), load16(res + c0, m)), m);
  }
}
#endif

// ------------------------------------------------------------------------------------------
// Row-range entry points (rows [r0, r1)); strides in elements; inner dim contiguous.
template <typename T, typename W>
void rms_norm_rows(const T* x, int64_t x_stride, const W* w, T* out, int64_t out_stride,
                   int64_t H, float eps, int64_t r0, int64_t r1, bool avx512) {
#if BI_X86
  if (avx512) {
    for (int64_t t = r0; t < r1; ++t)
      rms_norm_row_avx512<T, W>(x + t * x_stride, w, out + t * out_stride, H, eps);
    return;
  }
#endif
  (void)avx512;
  for (int64_t t = r0; t < r1; ++t)
    rms_norm_row_portable<T, W>(x + t * x_stride, w, out + t * out_stride, H, eps);
}

template <typename T, typename W>
void fused_add_rms_norm_rows(const T* x, int64_t x_stride, const T* res, int64_t res_stride,
                             const W* w, T* out, int64_t out_stride, T* res_out,
                             int64_t res_out_stride, int64_t H, float eps, int64_t r0, int64_t r1,
                             bool avx512) {
#if BI_X86
  if (avx512) {
    for (int64_t t = r0; t < r1; ++t) {
      T* z = res_out + t * res_out_stride;
      add_round_row_avx512<T>(x + t * x_stride, res + t * res_stride, z, H);
      rms_norm_row_avx512<T, W>(z, w, out + t * out_stride, H, eps);
    }
    return;
  }
#endif
  (void)avx512;
  for (int64_t t = r0; t < r1; ++t) {
    T* z = res_out + t * res_out_stride;
    add_round_row_portable<T>(x + t * x_stride, res + t * res_stride, z, H);
    rms_norm_row_portable<T, W>(z, w, out + t * out_stride, H, eps);
  }
}

}  // namespace kernels
}  // namespace cpu
}  // namespace bi
