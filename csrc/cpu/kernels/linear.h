// Batch-invariant CPU GEMM kernel bodies (framework-free): y[m, n] = sum_k x[m, k] * w[n, k].
//
// Per output element the reduction is the contract's lane-strided dot product, identical in every
// code path (any microkernel shape, any M, N, tile, thread count):
//   * float / fp16 inputs: 16 fp32 lanes; lane l accumulates k = 16*c + l (c = 0, 1, ... in order)
//     with acc_l = fma(x, w, acc_l) (fp16 converted to fp32 first, exact). Tail: zeros (so the
//     tail lanes do acc_l = fma(0, 0, acc_l)).
//   * bf16 inputs: 16 fp32 lanes; step c covers k = 32*c .. 32*c+31, lane l gets the pair
//     (2l+1, 2l) with the semantics of vdpbf16ps (Intel SDM): inputs DAZ, then
//       acc_l = ftz(fma(x[32c+2l+1], w[32c+2l+1], acc_l)); acc_l = ftz(fma(x[32c+2l], w[32c+2l], acc_l))
//     (each an fp32 fma with RNE, denormal results flushed to a zero of the same sign). The
//     avx512_bf16 path uses the instruction itself, the avx512 and portable paths this emulation.
//     Tail: zeros.
//   * then the 16 lanes are folded by the contract tree (tree_reduce16 / tree_reduce16_v); the
//     caller adds the bias in fp32 and rounds once to the output type.
// Weights are read in place (no packing): w is [N, K] with row stride ldw.
#pragma once

#include <cstdint>

#include "../common.h"

namespace bi {
namespace cpu {
namespace linear_kernel {

// Microkernel flags (K blocking): kLoadAcc = continue from the saved accumulators (else start
// from +0); kFinal = fold the lanes into the results (else save the accumulators).
enum : int { kLoadAcc = 1, kFinal = 2 };

// ------------------------------------------------------------------------------------------
// Portable scalar path (same operations in the same order as the vector paths).
static inline float daz_f32(float v) {
  uint32_t u = f32_to_bits(v);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  return bits_to_f32(u);
}
static inline float ftz_f32(float v) { return daz_f32(v); }

template <typename T>
static inline float dot_portable(const T* x, const T* w, int64_t K) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      int64_t k = k0 + l;
      float a = k < K ? to_f32(x[k]) : 0.0f;
      float b = k < K ? to_f32(w[k]) : 0.0f;
      acc[l] = std::fma(a, b, acc[l]);
    }
  }
  return tree_reduce16(acc);
}

template <>
inline float dot_portable<bf16_t>(const bf16_t* x, const bf16_t* w, int64_t K) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += 2 * kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      int64_t ko = k0 + 2 * l + 1, ke = k0 + 2 * l;
      float xo = ko < K ? daz_f32(bf16_to_f32(x[ko])) : 0.0f;
      float wo = ko < K ? daz_f32(bf16_to_f32(w[ko])) : 0.0f;
      float xe = ke < K ? daz_f32(bf16_to_f32(x[ke])) : 0.0f;
      float we = ke < K ? daz_f32(bf16_to_f32(w[ke])) : 0.0f;
      float a = ftz_f32(std::fma(xo, wo, acc[l]));
      acc[l] = ftz_f32(std::fma(xe, we, a));
    }
  }
  return tree_reduce16(acc);
}

// r[i*NR + j] = dot(x row i, w row j) for a MR x NR block.
template <typename T>
static void block_portable(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t K, int mr,
                           int nr, float* r) {
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) r[i * nr + j] = dot_portable<T>(x + i * ldx, w + j * ldw, K);
}

#if BI_X86
// ------------------------------------------------------------------------------------------
// AVX-512 microkernels: MR rows of x times NR rows of w over a K range, MR*NR zmm accumulators
// (one per output element). Final results (tree-reduced, no bias) go to r[i*NR + j].

// K blocking: a K range may be processed in several calls; the accumulators are then kept in
// abuf (MR*NR*16 fp32, exact) between calls, so every lane sees the same sequence as in one call.
// flags: kLoadAcc = continue from abuf (else start from +0); kFinal = fold the lanes into r
// (else store the accumulators to abuf).

template <int MR, int NR>
BI_AVX512 static inline void acc_init(__m512 (&acc)[MR][NR], const float* abuf, int flags) {
  if (flags & kLoadAcc) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_loadu_ps(abuf + (i * NR + j) * kLanes);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  }
}
// The contract tree on 16 accumulators at once: out[t] = tree_reduce16_v(a[t]) bit for bit. Every
// level does the same additions as tree_reduce16_v (lane i + lane i+s, lower operand first), only
// several accumulators share one register. Input slot j + 4q holds accumulator 4j + q so that the
// results come out in natural order.
BI_AVX512 static inline void tree_reduce16x16(const __m512* a, float* out) {
  __m512 in[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) in[(t >> 2) + 4 * (t & 3)] = a[t];
  // s = 8: [a | b] halves
  __m512 z[8];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)
    z[p] = _mm512_add_ps(_mm512_shuffle_f32x4(in[2 * p], in[2 * p + 1], 0x44),
                         _mm512_shuffle_f32x4(in[2 * p], in[2 * p + 1], 0xEE));
  // s = 4: 128-bit lanes (0,2 | 0,2) + (1,3 | 1,3)
  __m512 v[4];
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)
    v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * p], z[2 * p + 1], 0x88),
                         _mm512_shuffle_f32x4(z[2 * p], z[2 * p + 1], 0xDD));
  // s = 2: within 128-bit lanes (0,1 | 0,1) + (2,3 | 2,3)
  __m512 u[2];
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p)
    u[p] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * p], v[2 * p + 1], 0x44),
                         _mm512_shuffle_ps(v[2 * p], v[2 * p + 1], 0xEE));
  // s = 1: (0,2 | 0,2) + (1,3 | 1,3)
  __m512 f = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
  _mm512_storeu_ps(out, f);
}

template <int MR, int NR>
BI_AVX512 static inline void acc_fini(__m512 (&acc)[MR][NR], float* abuf, int flags, float* r) {
  if (flags & kFinal) {
    constexpr int kG = (MR * NR) / 16;  // groups of 16 accumulators reduced together
#pragma GCC unroll 4
    for (int g = 0; g < kG; ++g) tree_reduce16x16(&acc[0][0] + 16 * g, r + 16 * g);
#pragma GCC unroll 16
    for (int t = 16 * kG; t < MR * NR; ++t) r[t] = tree_reduce16_v((&acc[0][0])[t]);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) _mm512_storeu_ps(abuf + (i * NR + j) * kLanes, acc[i][j]);
  }
}

// float / fp16: 16 elements per step.
template <int MR, int NR, typename T>
BI_AVX512 static void mk_fma(const T* x, int64_t ldx, const T* w, int64_t ldw, int64_t K,
                             float* abuf, int flags, float* r) {
  __m512 acc[MR][NR];
  acc_init<MR, NR>(acc, abuf, flags);
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    __m512 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = load16(x + i * ldx + k, __mmask16(0xffff));
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m512 wv = load16(w + j * ldw + k, __mmask16(0xffff));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  if (k < K) {
    __mmask16 m = tail_mask(K - k);
    __m512 xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = load16(x + i * ldx + k, m);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m512 wv = load16(w + j * ldw + k, m);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  acc_fini<MR, NR>(acc, abuf, flags, r);
}

BI_AVX512 static inline __mmask32 tail_mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << n) - 1u);
}

// bf16 with the vdpbf16ps instruction: 32 elements per step.
template <int MR, int NR>
BI_AVX512BF16 static void mk_dpbf16(const bf16_t* x, int64_t ldx, const bf16_t* w, int64_t ldw,
                                    int64_t K, float* abuf, int flags, float* r) {
  __m512 acc[MR][NR];
  acc_init<MR, NR>(acc, abuf, flags);
  int64_t k = 0;
  for (; k + 2 * kLanes <= K; k += 2 * kLanes) {
    __m512i xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_si512((const void*)(x + i * ldx + k));
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m512i wv = _mm512_loadu_si512((const void*)(w + j * ldw + k));
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
  if (k < K) {
    __mmask32 m = tail_mask32(K - k);
    __m512i xv[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_epi16(m, x + i * ldx + k);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m512i wv = _mm512_maskz_loadu_epi16(m, w + j * ldw + k);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv[i], (__m512bh)wv);
    }
  }
  acc_fini<MR, NR>(acc, abuf, flags, r);
}

// vdpbf16ps emulation (AVX-512F): split each dword into the odd (high) and even (low) bf16 as
// fp32, DAZ, then two fma steps each followed by FTZ.
BI_AVX512 static inline __m512 bf16_daz(__m512 v) {
  __mmask16 den = _mm512_fpclass_ps_mask(v, 0x20);  // denormal
  return _mm512_mask_and_ps(v, den, v, _mm512_castsi512_ps(_mm512_set1_epi32(int(0x80000000u))));
}
BI_AVX512 static inline __m512 bf16_odd(__m512i v) {
  return bf16_daz(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))));
}
BI_AVX512 static inline __m512 bf16_even(__m512i v) {
  return bf16_daz(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
}
BI_AVX512 static inline __m512 dp_emu_step(__m512 acc, __m512 xo, __m512 xe, __m512 wo, __m512 we) {
  acc = bf16_daz(_mm512_fmadd_ps(xo, wo, acc));  // ftz of the result: same test as daz
  return bf16_daz(_mm512_fmadd_ps(xe, we, acc));
}

template <int MR, int NR>
BI_AVX512 static void mk_dpbf16_emu(const bf16_t* x, int64_t ldx, const bf16_t* w, int64_t ldw,
                                    int64_t K, float* abuf, int flags, float* r) {
  __m512 acc[MR][NR];
  acc_init<MR, NR>(acc, abuf, flags);
  for (int64_t k = 0; k < K; k += 2 * kLanes) {
    __mmask32 m = tail_mask32(K - k);
    __m512 xo[MR], xe[MR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m512i v = _mm512_maskz_loadu_epi16(m, x + i * ldx + k);
      xo[i] = bf16_odd(v);
      xe[i] = bf16_even(v);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      __m512i v = _mm512_maskz_loadu_epi16(m, w + j * ldw + k);
      __m512 wo = bf16_odd(v), we = bf16_even(v);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[i][j] = dp_emu_step(acc[i][j], xo[i], xe[i], wo, we);
    }
  }
  acc_fini<MR, NR>(acc, abuf, flags, r);
}
#endif  // BI_X86

// ------------------------------------------------------------------------------------------
// Dispatch of one MR x NR block (mr in 1..kMR, nr in 1..main_nr(mr)).
enum class Path : int { kPortable = 0, kFma = 1, kDpBf16 = 2, kDpBf16Emu = 3 };

// Register budget: MR*NR accumulators + MR x vectors + 1 w vector <= 32 zmm.
// Main tile: kMR rows of x x 4 rows of w (24 zmm accumulators); M tails (mr < kMR) use wider NR.
constexpr int kMR = 6;
static inline int main_nr(int mr) { return mr <= 2 ? 8 : mr == 3 ? 6 : 4; }

using MkFn = void (*)(const void*, int64_t, const void*, int64_t, int64_t, float*, int, float*);

#if BI_X86
template <typename T>
struct FmaK {
  template <int MR, int NR>
  static void call(const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K, float* abuf,
                   int flags, float* r) {
    mk_fma<MR, NR, T>((const T*)x, ldx, (const T*)w, ldw, K, abuf, flags, r);
  }
};
struct DpK {
  template <int MR, int NR>
  static void call(const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K, float* abuf,
                   int flags, float* r) {
    mk_dpbf16<MR, NR>((const bf16_t*)x, ldx, (const bf16_t*)w, ldw, K, abuf, flags, r);
  }
};
struct EmuK {
  template <int MR, int NR>
  static void call(const void* x, int64_t ldx, const void* w, int64_t ldw, int64_t K, float* abuf,
                   int flags, float* r) {
    mk_dpbf16_emu<MR, NR>((const bf16_t*)x, ldx, (const bf16_t*)w, ldw, K, abuf, flags, r);
  }
};

template <class F>
static MkFn pick_mk(int mr, int nr) {
  switch (mr * 16 + nr) {
#define BI_LIN_CASE(a, b) \
  case a * 16 + b: return &F::template call<a, b>;
    BI_LIN_CASE(1, 1) BI_LIN_CASE(1, 2) BI_LIN_CASE(1, 3) BI_LIN_CASE(1, 4)
    BI_LIN_CASE(1, 5) BI_LIN_CASE(1, 6) BI_LIN_CASE(1, 7) BI_LIN_CASE(1, 8)
    BI_LIN_CASE(2, 1) BI_LIN_CASE(2, 2) BI_LIN_CASE(2, 3) BI_LIN_CASE(2, 4)
    BI_LIN_CASE(2, 5) BI_LIN_CASE(2, 6) BI_LIN_CASE(2, 7) BI_LIN_CASE(2, 8)
    BI_LIN_CASE(3, 1) BI_LIN_CASE(3, 2) BI_LIN_CASE(3, 3) BI_LIN_CASE(3, 4)
    BI_LIN_CASE(3, 5) BI_LIN_CASE(3, 6)
    BI_LIN_CASE(4, 1) BI_LIN_CASE(4, 2) BI_LIN_CASE(4, 3) BI_LIN_CASE(4, 4)
    BI_LIN_CASE(5, 1) BI_LIN_CASE(5, 2) BI_LIN_CASE(5, 3) BI_LIN_CASE(5, 4)
    BI_LIN_CASE(6, 1) BI_LIN_CASE(6, 2) BI_LIN_CASE(6, 3) BI_LIN_CASE(6, 4)
#undef BI_LIN_CASE
    default: return nullptr;
  }
}

template <typename T>
static inline MkFn select_mk(Path p, int mr, int nr) {
  if (p == Path::kDpBf16) return pick_mk<DpK>(mr, nr);
  if (p == Path::kDpBf16Emu) return pick_mk<EmuK>(mr, nr);
  return pick_mk<FmaK<T>>(mr, nr);
}
#endif

template <typename T> struct DtypeCode;
template <> struct DtypeCode<float> { static constexpr int v = 0; };
template <> struct DtypeCode<fp16_t> { static constexpr int v = 1; };
template <> struct DtypeCode<bf16_t> { static constexpr int v = 2; };

template <typename T>
static inline Path select_path(Isa isa) {
  if (isa == Isa::kPortable) return Path::kPortable;
  if (DtypeCode<T>::v == 2) return isa == Isa::kAvx512Bf16 ? Path::kDpBf16 : Path::kDpBf16Emu;
  return Path::kFma;
}

// ------------------------------------------------------------------------------------------
// Blocking parameters (speed only; the bits never depend on them).
// K block: 4 KiB of each row per pass (multiple of the 16- and 32-element steps).
template <typename T>
static inline int64_t k_block_elems() { return int64_t(4096 / sizeof(T)); }
constexpr int64_t kMChunk = 60;  // rows of x per K-blocked pass (multiple of kMR)

// True when a tile of `rows` x-rows is computed in K blocks (accumulators kept in a buffer).
template <typename T>
static inline bool use_k_blocking(Isa isa, int64_t rows, int64_t K) {
  const int64_t kb = k_block_elems<T>();
  return isa != Isa::kPortable && rows > 4 && K > kb + kb / 2;
}

// Computes the tile y[m0:m1, n0:n1]. x: row m at x + m*ldx; w: row n at w + n*ldw; y: row m at
// y + m*ldy; bias: fp32 [N] or null. nb_rows: rows of w per cache block when K is not blocked.
template <typename T, typename OutT>
static void linear_tile(const T* x, int64_t ldx, const T* w, int64_t ldw, const float* bias,
                        OutT* y, int64_t ldy, int64_t K, int64_t m0, int64_t m1, int64_t n0,
                        int64_t n1, int64_t nb_rows, Isa isa) {
  const Path path = select_path<T>(isa);
  const bool kblocked = use_k_blocking<T>(isa, m1 - m0, K);
  const int64_t kb = kblocked ? k_block_elems<T>() : (K > 0 ? K : 1);
  const int64_t mc = kblocked ? kMChunk : (m1 - m0);
  if (kblocked) nb_rows = n1 - n0;
  float* abuf = kblocked ? new float[size_t(mc * nb_rows * kLanes)] : nullptr;
  float r[32];
  for (int64_t nb = n0; nb < n1; nb += nb_rows) {
    const int64_t nbe = nb + nb_rows < n1 ? nb + nb_rows : n1;
    const int64_t nbw = nbe - nb;
    for (int64_t mc0 = m0; mc0 < m1; mc0 += mc) {
      const int64_t mc1 = mc0 + mc < m1 ? mc0 + mc : m1;
      for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kb) {
        const int64_t klen = K - k0 < kb ? K - k0 : kb;
        const int flags = (k0 > 0 ? kLoadAcc : 0) | (k0 + klen >= K ? kFinal : 0);
        for (int64_t m = mc0; m < mc1; m += kMR) {
          const int mr = int(mc1 - m < kMR ? mc1 - m : kMR);
          const int nrm = main_nr(mr);
          const T* xp = x + m * ldx + k0;
          for (int64_t n = nb; n < nbe; n += nrm) {
            const int nr = int(nbe - n < nrm ? nbe - n : nrm);
            const T* wp = w + n * ldw + k0;
            float* ab = abuf != nullptr ? abuf + ((m - mc0) * nbw + (n - nb) * mr) * kLanes : nullptr;
#if BI_X86
            if (path != Path::kPortable) select_mk<T>(path, mr, nr)(xp, ldx, wp, ldw, klen, ab, flags, r);
            else
#endif
              block_portable<T>(xp, ldx, wp, ldw, klen, mr, nr, r);
            if (!(flags & kFinal)) continue;
            for (int i = 0; i < mr; ++i) {
              OutT* yr = y + (m + i) * ldy + n;
              for (int j = 0; j < nr; ++j) {
                float v = r[i * nr + j];
                if (bias != nullptr) v = v + bias[n + j];
                yr[j] = from_f32<OutT>(v);
              }
            }
          }
        }
      }
    }
  }
  delete[] abuf;
}

}  // namespace linear_kernel
}  // namespace cpu
}  // namespace bi
