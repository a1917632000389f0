// Shared, framework-free helpers for the CPU kernels: number formats, the fixed lane tree of the
// invariance contract, a deterministic exp, and ISA detection.
//
// Rule for every kernel: the scalar (portable) path and the AVX-512 path of a helper produce the
// same bits for the same inputs (same IEEE operations in the same order, fma where the other
// uses fma). Tails are handled with masked vector operations, never a different formula.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../generated/bi_contract.h"

#if defined(__x86_64__) || defined(_M_X64)
#define BI_X86 1
#include <immintrin.h>
#else
#define BI_X86 0
#endif

namespace bi {
namespace cpu {

constexpr int kLanes = contract::CPU_LANES;
static_assert(kLanes == 16, "the AVX-512 kernels assume 16 fp32 lanes");

// ------------------------------------------------------------------------------------------
// Number formats (bit exact, round to nearest even, NaN stays NaN).
struct bf16_t { uint16_t x; };
struct fp16_t { uint16_t x; };

static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(bf16_t v) { return bits_to_f32(uint32_t(v.x) << 16); }
static inline bf16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

static inline float fp16_to_f32(fp16_t h) {
  uint32_t sign = uint32_t(h.x & 0x8000u) << 16;
  uint32_t exp = (h.x >> 10) & 0x1fu;
  uint32_t man = h.x & 0x3ffu;
  if (exp == 0) {
    if (man == 0) return bits_to_f32(sign);
    // subnormal: normalise
    int e = -1;
    do { e++; man <<= 1; } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return bits_to_f32(sign | (uint32_t(127 - 15 - e) << 23) | (man << 13));
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
static inline fp16_t f32_to_fp16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16_t{uint16_t(sign | 0x7e00u)};       // NaN
  if (a >= 0x477ff000u) return fp16_t{uint16_t(sign | 0x7c00u)};      // overflow -> inf
  if (a < 0x38800000u) {                                              // subnormal or zero
    // value = a as float; fp16 subnormal unit is 2^-24. Add a magic number to round (RNE).
    float v = bits_to_f32(a) + 0.5f;  // 0.5 = 2^-1: ulp at that scale is 2^-24
    return fp16_t{uint16_t(sign | (f32_to_bits(v) - f32_to_bits(0.5f)))};
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return fp16_t{uint16_t(sign | (a >> 13))};
}

template <typename T> static inline float to_f32(T v);
template <> inline float to_f32<float>(float v) { return v; }
template <> inline float to_f32<bf16_t>(bf16_t v) { return bf16_to_f32(v); }
template <> inline float to_f32<fp16_t>(fp16_t v) { return fp16_to_f32(v); }
template <typename T> static inline T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline bf16_t from_f32<bf16_t>(float v) { return f32_to_bf16(v); }
template <> inline fp16_t from_f32<fp16_t>(float v) { return f32_to_fp16(v); }

// ------------------------------------------------------------------------------------------
// The contract's lane tree: for s in (8,4,2,1): v[i] += v[i+s] for i < s.
static inline float tree_reduce16(float v[kLanes]) {
  for (int s = 8; s >= 1; s >>= 1)
    for (int i = 0; i < s; ++i) v[i] = v[i] + v[i + s];
  return v[0];
}
// Same tree with max (max is exact, the order only matters for NaN propagation).
static inline float tree_max16(float v[kLanes]) {
  for (int s = 8; s >= 1; s >>= 1)
    for (int i = 0; i < s; ++i) v[i] = v[i] > v[i + s] ? v[i] : v[i + s];
  return v[0];
}

// ------------------------------------------------------------------------------------------
// Deterministic exp(x) for fp32: exp(x) = 2^n * p(r), n = round(x*log2e), r = x - n*ln2 (two
// fma steps, Cody-Waite), p = degree-6 polynomial (Horner with fma). Max error ~2 ulp. The
// vector version below does the identical operation sequence, so both give the same bits.
namespace expc {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187045e-06f;
constexpr float kMax = 88.72283935546875f;  // ln(FLT_MAX); above: +inf
constexpr float kMin = -103.972076416f;     // below: 0
constexpr float c2 = 0.5f, c3 = 1.6666667163e-01f, c4 = 4.1666537523e-02f,
                c5 = 8.3333477378e-03f, c6 = 1.3887316594e-03f, c7 = 1.9845665677e-04f;
}  // namespace expc

static inline float exp_f32(float x) {
  using namespace expc;
  if (x != x) return x;
  if (x > kMax) return INFINITY;
  if (x < kMin) return 0.0f;
  float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = c7;
  p = std::fma(p, r, c6);
  p = std::fma(p, r, c5);
  p = std::fma(p, r, c4);
  p = std::fma(p, r, c3);
  p = std::fma(p, r, c2);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  // 2^n in two steps so that n down to -150 (subnormal results) is exact: 2^(n/2) * 2^(n - n/2)
  int ni = int(n);
  int n1 = ni / 2, n2 = ni - n1;
  float s1 = bits_to_f32(uint32_t(n1 + 127) << 23);
  float s2 = bits_to_f32(uint32_t(n2 + 127) << 23);
  return (p * s1) * s2;
}

// ------------------------------------------------------------------------------------------
// ISA detection (decided once, at first use).
enum class Isa : int { kPortable = 0, kAvx512 = 1, kAvx512Bf16 = 2 };
Isa detected_isa();         // defined in isa.cpp
const char* isa_name(Isa);  // "portable" | "avx512" | "avx512_bf16"
// Kernels call this: honours the BATCH_INVARIANT_CPU_ISA override (portable|avx512|avx512_bf16,
// never above what the CPU has) so tests can compare paths on one machine.
Isa active_isa();

#if BI_X86
#define BI_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define BI_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")))

BI_AVX512 static inline float tree_reduce16_v(__m512 v) {
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  __m128 d = _mm_add_ss(c, _mm_shuffle_ps(c, c, 1));
  return _mm_cvtss_f32(d);
}
BI_AVX512 static inline float tree_max16_v(__m512 v) {
  float t[kLanes];
  _mm512_storeu_ps(t, v);
  return tree_max16(t);
}

BI_AVX512 static inline __m512 exp_f32_v(__m512 x) {
  using namespace expc;
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  __mmask16 big = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMax), _CMP_GT_OQ);
  __mmask16 small = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kMin), _CMP_LT_OQ);
  __m512 xc = _mm512_maskz_mov_ps(~(nan | big | small), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Hi), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-kLn2Lo), r);
  __m512 p = _mm512_set1_ps(c7);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c5));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  __m512i ni = _mm512_cvtps_epi32(n);  // n is integral already
  // n1 = trunc(n/2) as C division does, n2 = n - n1
  __m512i n1 = _mm512_srai_epi32(_mm512_add_epi32(ni, _mm512_srli_epi32(ni, 31)), 1);
  __m512i n2 = _mm512_sub_epi32(ni, n1);
  __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, _mm512_set1_epi32(127)), 23));
  __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, _mm512_set1_epi32(127)), 23));
  __m512 res = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
  res = _mm512_mask_mov_ps(res, big, _mm512_set1_ps(INFINITY));
  res = _mm512_mask_mov_ps(res, small, _mm512_setzero_ps());
  res = _mm512_mask_mov_ps(res, nan, x);
  return res;
}

// Masked loads/stores converting to / from fp32 (16 elements; `m` selects valid lanes, others 0).
BI_AVX512 static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
BI_AVX512 static inline __m512 load16(const bf16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
BI_AVX512 static inline __m512 load16(const fp16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
BI_AVX512 static inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
BI_AVX512 static inline void store16(bf16_t* p, __m512 v, __mmask16 m) {
  // round to nearest even, NaN -> quiet NaN: identical to f32_to_bf16
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
BI_AVX512 static inline void store16(fp16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}
#endif  // BI_X86

}  // namespace cpu
}  // namespace bi
