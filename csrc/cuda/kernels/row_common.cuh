// Shared pieces of the CUDA row kernels (rms_norm.cuh, row_softmax.cuh): the fixed per-row
// reduction order, deterministic exp / log, chunked loads and stores, and the THREADS dispatch.
// Torch-free; compiles with nvcc and, with -DBI_CUDA_SIM, with g++ for the CPU simulator.
//
// The CUDA backend's row reduction order (a function of the row length, T and THREADS only;
// THREADS is itself a function of the row length, see rms_norm_threads / row_softmax_threads):
//   * the row is cut into chunks of VEC = 16 / sizeof(T) consecutive elements (16 bytes; the last
//     chunk may be partial); chunk c belongs to thread c % THREADS;
//   * each thread folds its elements in increasing index order into one fp32 accumulator
//     (sum: acc = add_rn(acc, v), or fma_rn(z, z, acc) for a sum of squares; max: acc =
//     MaxOp::apply(acc, v)), starting from +0 (sum) / -inf (max); missing elements are skipped;
//   * the 32 lanes of a warp are combined by a butterfly: for m in (16, 8, 4, 2, 1):
//     v = v (op) shfl_xor(v, m)  (every lane ends with the same bits: op is commutative);
//   * the warps' values (warp w's lane-0 value in shared memory) are combined by a fixed tree:
//     for s in (NW/2, ..., 1): p[i] = p[i] (op) p[i + s] for i < s; every thread computes it.
// Whether a chunk is loaded with 16-byte vector loads or element by element (alignment, the
// partial tail chunk) does not change any value or its position in the order.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../intrinsics.cuh"

namespace bi {
namespace cuda {

constexpr int kWarp = 32;

// ------------------------------------------------------------------------------------------
// Deterministic exp (the CPU backend's exp_f32 from csrc/cpu/common.h, same constants and the
// same operation sequence, written with the explicit _rn wrappers): exp(x) = 2^n * p(r),
// n = rint(x * log2e), r = x - n*ln2 (two fma, Cody-Waite), p = degree-7 Horner in fma;
// 2^n applied in two exact steps (subnormal results). Max error ~2 ulp. NaN -> NaN,
// x > ln(FLT_MAX) -> +inf, x < -103.97 -> +0 (so exp(-inf) = 0).
namespace expc {
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187045e-06f;
constexpr float kMax = 88.72283935546875f;
constexpr float kMin = -103.972076416f;
constexpr float c2 = 0.5f, c3 = 1.6666667163e-01f, c4 = 4.1666537523e-02f, c5 = 8.3333477378e-03f,
                c6 = 1.3887316594e-03f, c7 = 1.9845665677e-04f;
}  // namespace expc

BI_DEV float exp_f32(float x) {
  using namespace expc;
  if (x != x) return x;
  if (x > kMax) return uint_as_float(0x7f800000u);
  if (x < kMin) return 0.0f;
  const float n = rint_rn(mul_rn(x, kLog2e));
  float r = fma_rn(n, -kLn2Hi, x);
  r = fma_rn(n, -kLn2Lo, r);
  float p = c7;
  p = fma_rn(p, r, c6);
  p = fma_rn(p, r, c5);
  p = fma_rn(p, r, c4);
  p = fma_rn(p, r, c3);
  p = fma_rn(p, r, c2);
  p = fma_rn(p, r, 1.0f);
  p = fma_rn(p, r, 1.0f);
  const int ni = int(n);
  const int n1 = ni / 2, n2 = ni - n1;
  const float s1 = uint_as_float(uint32_t(n1 + 127) << 23);
  const float s2 = uint_as_float(uint32_t(n2 + 127) << 23);
  return mul_rn(mul_rn(p, s1), s2);
}

// Deterministic natural log (this backend's own routine; the CPU backend uses the C library's
// logf, so log_softmax bits differ between the backends by design). fdlibm's scheme in fp32:
//   a = m * 2^e with m in [sqrt(1/2), sqrt(2)) (subnormals pre-scaled by 2^23, exactly);
//   f = m - 1 (exact), s = f / (2 + f), z = s^2,
//   R = z * (2/3 + z * (2/5 + z * (2/7 + z * (2/9 + z * 2/11))))   (Horner in fma; |s| <= 0.1716)
//   log(m) = f - (f^2/2 - s * (f^2/2 + R))    (= 2 atanh(s); the exact f carries the result)
//   log(a) = e*ln2_hi + (f - (f^2/2 - (s * (f^2/2 + R) + e*ln2_lo)))   (e*ln2_hi exact)
// Max error ~1 ulp (measured by tests/cuda). NaN -> NaN, a < 0 -> NaN, +-0 -> -inf, +inf -> +inf.
BI_DEV float log_f32(float a) {
  if (a != a) return a;
  if (a < 0.0f) return uint_as_float(0x7fffffffu);
  if (a == 0.0f) return uint_as_float(0xff800000u);
  if (a == uint_as_float(0x7f800000u)) return a;
  int e_adj = 0;
  if (a < 1.17549435e-38f) {  // subnormal: scale by 2^23 (exact)
    a = mul_rn(a, 8388608.0f);
    e_adj = -23;
  }
  const uint32_t bits = float_as_uint(a);
  int e = int((bits >> 23) & 0xffu) - 127 + e_adj;
  float m = uint_as_float((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  if (m > 1.41421356f) {
    m = mul_rn(m, 0.5f);  // exact
    e += 1;
  }
  const float f = sub_rn(m, 1.0f);
  const float s = div_rn(f, add_rn(2.0f, f));
  const float z = mul_rn(s, s);
  float R = 1.8181818182e-01f;           // 2/11
  R = fma_rn(R, z, 2.2222222222e-01f);   // 2/9
  R = fma_rn(R, z, 2.8571428571e-01f);   // 2/7
  R = fma_rn(R, z, 4.0000000000e-01f);   // 2/5
  R = fma_rn(R, z, 6.6666666667e-01f);   // 2/3
  R = mul_rn(R, z);
  const float hfsq = mul_rn(mul_rn(0.5f, f), f);
  const float ef = float(e);
  const float lo = fma_rn(s, add_rn(hfsq, R), mul_rn(ef, expc::kLn2Lo));
  return add_rn(mul_rn(ef, expc::kLn2Hi), sub_rn(f, sub_rn(hfsq, lo)));
}

// ------------------------------------------------------------------------------------------
// Reductions (see the order at the top). `scratch`: NW = THREADS / 32 floats of shared memory
// used by this call only (a kernel with several reductions passes a separate buffer to each, so
// no barrier is needed after the read). Every thread returns the same bits.
struct SumOp {
  static BI_DEV float apply(float a, float b) { return add_rn(a, b); }
};
struct MaxOp {
  // Commutative bit for bit (so all lanes of the butterfly agree): max(+0, -0) = +0, and a NaN
  // operand gives the canonical NaN 0x7fffffff.
  static BI_DEV float apply(float a, float b) {
    if (a > b) return a;
    if (b > a) return b;
    if (a == b) return uint_as_float(float_as_uint(a) & float_as_uint(b));
    return uint_as_float(0x7fffffffu);
  }
};

template <typename Op, int THREADS>
BI_DEV float block_reduce(float v, float* scratch) {
  static_assert(THREADS % kWarp == 0 && THREADS >= kWarp && THREADS <= 1024, "THREADS: a multiple of 32 up to 1024");
  constexpr int NW = THREADS / kWarp;
  static_assert((NW & (NW - 1)) == 0, "THREADS / 32 must be a power of two");
#pragma unroll
  for (int m = kWarp / 2; m >= 1; m >>= 1) v = Op::apply(v, warp_shfl_xor(v, m));
  if constexpr (NW == 1) {
    return v;
  } else {
    const int tid = int(threadIdx.x);
    if ((tid & (kWarp - 1)) == 0) scratch[tid / kWarp] = v;
    block_sync();
    float p[NW];
#pragma unroll
    for (int i = 0; i < NW; ++i) p[i] = scratch[i];
#pragma unroll
    for (int s = NW / 2; s >= 1; s >>= 1)
#pragma unroll
      for (int i = 0; i < s; ++i) p[i] = Op::apply(p[i], p[i + s]);
    return p[0];
  }
}

// ------------------------------------------------------------------------------------------
// Chunks of VEC = 16 / sizeof(T) elements: loaded as one 16-byte vector when the chunk is full
// and its address 16-byte aligned, else element by element (same values either way).
template <typename T>
struct Chunk {
  static constexpr int VEC = 16 / int(sizeof(T));
  static_assert(VEC * sizeof(T) == 16, "element size must divide 16");
};

template <typename T>
BI_DEV bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Loads elements [c*VEC, c*VEC + n) of `row` (n = VEC unless the tail chunk) as fp32 into
// v[0..n) (v[n..VEC) = 0). VEC is the chunk of the row's *reduction* type; T may be wider (a
// float weight for a bf16 row): then several 16-byte loads per chunk.
template <int VEC, typename T>
BI_DEV void load_chunk(const T* row, int64_t c, int n, bool row_aligned, float (&v)[VEC]) {
  const T* p = row + c * VEC;
  constexpr int TV = 16 / int(sizeof(T));  // elements per 16-byte load
  static_assert(VEC % TV == 0, "a chunk must be a whole number of 16-byte vectors of T");
  if (n == VEC && row_aligned) {
#pragma unroll
    for (int k = 0; k < VEC / TV; ++k) {
      const uint4 u = *reinterpret_cast<const uint4*>(p + k * TV);
      T e[TV];
      memcpy(static_cast<void*>(e), &u, 16);
#pragma unroll
      for (int j = 0; j < TV; ++j) v[k * TV + j] = to_f32(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = j < n ? to_f32(p[j]) : 0.0f;
  }
}

// Stores from_f32<O>(v[j]) to elements [c*VEC, c*VEC + n) of `row` (O as wide as the chunk's
// type or wider).
template <int VEC, typename O>
BI_DEV void store_chunk(O* row, int64_t c, int n, bool row_aligned, const float (&v)[VEC]) {
  O* p = row + c * VEC;
  constexpr int OV = 16 / int(sizeof(O));  // elements per 16-byte store
  static_assert(VEC % OV == 0, "a chunk must be a whole number of 16-byte vectors of O");
  if (n == VEC && row_aligned) {
#pragma unroll
    for (int k = 0; k < VEC / OV; ++k) {
      O e[OV];
#pragma unroll
      for (int j = 0; j < OV; ++j) e[j] = from_f32<O>(v[k * OV + j]);
      uint4 u;
      memcpy(&u, e, 16);
      *reinterpret_cast<uint4*>(p + k * OV) = u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) p[j] = from_f32<O>(v[j]);
  }
}

// ------------------------------------------------------------------------------------------
// Block size: a function of the row length only (never of the number of rows): about 8
// elements per thread, a power of two in [32, 1024].
inline int row_threads_for(int64_t n) {
  int t = 32;
  while (t < 1024 && int64_t(t) * 8 < n) t *= 2;
  return t;
}

// Calls f(std::integral_constant<int, THREADS>{}) for threads in {32, 64, ..., 1024}.
template <typename F>
void dispatch_threads(int threads, F&& f) {
  switch (threads) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    case 512: f(std::integral_constant<int, 512>{}); break;
    case 1024: f(std::integral_constant<int, 1024>{}); break;
    default:
      throw std::invalid_argument("bi::cuda::dispatch_threads: unsupported block size " + std::to_string(threads) +
                                  " (32, 64, ..., 1024)");
  }
}

}  // namespace cuda
}  // namespace bi
