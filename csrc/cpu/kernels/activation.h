// silu_and_mul kernel (framework-free). Per element, with a = fp32(x[t, d]), b = fp32(x[t, D + d]):
//   e = exp_f32(-a); s = a / (1.0f + e); out = round_T(s * b)
// (fp32, IEEE, in this order; exp_f32 / exp_f32_v from common.h give identical bits), so the
// portable and AVX-512 paths produce the same bits. Purely elementwise: no reduction.
#pragma once

#include <cstdint>

#include "../common.h"

namespace bi {
namespace cpu {
namespace kernels {

template <typename T>
static inline void silu_and_mul_row_portable(const T* x, T* out, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    float a = to_f32(x[d]);
    float b = to_f32(x[D + d]);
    float e = exp_f32(-a);
    float s = a / (1.0f + e);
    out[d] = from_f32<T>(s * b);
  }
}

#if BI_X86
template <typename T>
BI_AVX512 static void silu_and_mul_row_avx512(const T* x, T* out, int64_t D) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t c0 = 0; c0 < D; c0 += kLanes) {
    __mmask16 m = tail_mask(D - c0);
    __m512 a = load16(x + c0, m);
    __m512 b = load16(x + D + c0, m);
    __m512 e = exp_f32_v(_mm512_xor_ps(a, sign));  // -a (exact, like unary minus)
    __m512 s = _mm512_div_ps(a, _mm512_add_ps(one, e));
    store16(out + c0, _mm512_mul_ps(s, b), m);
  }
}
#endif

// Rows [r0, r1): x row t at x + t * x_stride holds [a (D) | b (D)]; out row t at out + t * out_stride.
template <typename T>
void silu_and_mul_rows(const T* x, int64_t x_stride, T* out, int64_t out_stride, int64_t D,
                       int64_t r0, int64_t r1, bool avx512) {
#if BI_X86
  if (avx512) {
    for (int64_t t = r0; t < r1; ++t) silu_and_mul_row_avx512<T>(x + t * x_stride, out + t * out_stride, D);
    return;
  }
#endif
  (void)avx512;
  for (int64_t t = r0; t < r1; ++t) silu_and_mul_row_portable<T>(x + t * x_stride, out + t * out_stride, D);
}

}  // namespace kernels
}  // namespace cpu
}  // namespace bi
