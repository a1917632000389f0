// Rotary embedding (vLLM layout): framework-free kernel body.
//
// cos_sin_cache fp32 [max_pos, rot_dim]: cos in columns [0, rot_dim/2), sin in [rot_dim/2, rot_dim).
// For each (token, head), with half = rot_dim/2, i in [0, half), c = cos[pos][i], s = sin[pos][i]:
//   NeoX  (is_neox):  x1 = x[i],    x2 = x[i + half]
//   GPT-J (!is_neox): x1 = x[2i],   x2 = x[2i + 1]
//   x1' = x1*c - x2*s;  x2' = x2*c + x1*s   (fp32: two products, then one sub / add; no fma)
// x converted to fp32 exactly, one rounding (RNE) to the dtype; dims [rot_dim, head_size) are
// copied unchanged. The AVX-512 path performs the same operations, so both give the same bits.
#pragma once

#include <cstdint>

#include "../common.h"

namespace bi {
namespace cpu {
namespace rope {

template <typename T>
struct Rope {
  const int64_t* pos;
  const float* cache;  // [max_pos, rot_dim], row stride cache_s
  int64_t cache_s;
  int rot_dim, head_size;
  bool neox;
};

// One (token, head) row: src -> dst (head_size elements each, contiguous).
template <typename T>
static inline void rope_row_portable(const Rope<T>& R, int64_t t, const T* src, T* dst) {
  const int half = R.rot_dim / 2;
  const float* cs = R.cache + R.pos[t] * R.cache_s;
  const float* sn = cs + half;
  for (int i = 0; i < half; ++i) {
    const int i1 = R.neox ? i : 2 * i, i2 = R.neox ? i + half : 2 * i + 1;
    const float x1 = to_f32<T>(src[i1]), x2 = to_f32<T>(src[i2]);
    const float c = cs[i], s = sn[i];
    const float a = x1 * c, b = x2 * s;
    const float e = x2 * c, f = x1 * s;
    dst[i1] = from_f32<T>(a - b);
    dst[i2] = from_f32<T>(e + f);
  }
  for (int d = R.rot_dim; d < R.head_size; ++d) dst[d] = src[d];
}

#if BI_X86
// NeoX layout: contiguous halves, vectorised over i.
template <typename T>
BI_AVX512 static inline void rope_row_neox_avx(const Rope<T>& R, int64_t t, const T* src, T* dst) {
  const int half = R.rot_dim / 2;
  const float* cs = R.cache + R.pos[t] * R.cache_s;
  const float* sn = cs + half;
  for (int i = 0; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    const __m512 x1 = load16(src + i, m), x2 = load16(src + half + i, m);
    const __m512 c = _mm512_maskz_loadu_ps(m, cs + i), s = _mm512_maskz_loadu_ps(m, sn + i);
    store16(dst + i, _mm512_sub_ps(_mm512_mul_ps(x1, c), _mm512_mul_ps(x2, s)), m);
    store16(dst + half + i, _mm512_add_ps(_mm512_mul_ps(x2, c), _mm512_mul_ps(x1, s)), m);
  }
  for (int d = R.rot_dim; d < R.head_size; ++d) dst[d] = src[d];
}
#endif

}  // namespace rope
}  // namespace cpu
}  // namespace bi
