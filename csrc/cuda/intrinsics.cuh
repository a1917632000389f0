// The one wrapper header for everything a CUDA kernel body may not write directly: warp shuffles
// and votes, barriers, dynamic shared memory, the explicitly rounded fp32 operations and the
// half / bfloat16 conversions (later: mma, ldmatrix, cp.async). Kernel bodies (csrc/cuda/kernels/
// *.cuh) call only these wrappers, never a CUDA intrinsic or inline PTX themselves.
//
//   BI_CUDA_SIM defined  -> the CPU SIMT simulator's implementations (csrc/cuda/sim/sim.h): the
//                           kernel bodies compile with g++ and run on the CPU, bit for bit as on
//                           the device (same IEEE operations, same order).
//   otherwise            -> the device implementations (nvcc).
//
// Interface (namespace bi::cuda; all __device__ __forceinline__):
//   block_sync()                        __syncthreads()
//   warp_sync()                         __syncwarp()            (full warp)
//   warp_shfl_xor(v, lane_mask)         __shfl_xor_sync(0xffffffff, v, lane_mask), v float|int|unsigned
//   warp_shfl(v, src_lane)              __shfl_sync(0xffffffff, v, src_lane)
//   warp_ballot(p) / warp_any(p) / warp_all(p)   full-warp votes
//   dynamic_smem<T>()                   the block's `extern __shared__` buffer (16-byte aligned)
//   add_rn sub_rn mul_rn div_rn sqrt_rn fma_rn   IEEE fp32, round to nearest even, never contracted
//   rint_rn(x)                          round to nearest integer, ties to even (fp32 result)
//   float_as_uint / uint_as_float       bit casts
//   to_f32(T) / from_f32<T>(float)      T in {float, __half, __nv_bfloat16}; from_f32 rounds to
//                                       nearest even (NaN -> the canonical NaN of the type)
// Warp operations need all 32 lanes of the warp (kernels keep them warp-uniform); the simulator
// reports a launch in which they are not (deadlock / divergence) as an error.
//
// Device builds must not use --use_fast_math / -ftz=true / -prec-div=false / -prec-sqrt=false:
// the _rn operations then flush subnormals (mul.rn.ftz) and the simulator would no longer match.
#pragma once

#include <cstdint>

#ifdef BI_CUDA_SIM
#include "sim/sim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace bi {
namespace cuda {

#ifdef BI_CUDA_SIM
#define BI_DEV inline
#else
#define BI_DEV __device__ __forceinline__
#endif

// ------------------------------------------------------------------------------------------
// Barriers, shuffles, votes.
#ifdef BI_CUDA_SIM

BI_DEV void block_sync() { sim::block_barrier(); }
BI_DEV void warp_sync() { sim::warp_exchange(0, sim::kWarpSync); }

template <typename V>
BI_DEV V sim_shfl(V v, int lane, sim::WarpOp op) {
  static_assert(sizeof(V) <= 8, "warp shuffles move at most 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  const uint64_t* all = sim::warp_exchange(bits, op);
  V r;
  std::memcpy(&r, &all[lane], sizeof(V));
  return r;
}
BI_DEV float warp_shfl_xor(float v, int lane_mask) {
  return sim_shfl(v, (sim::lane() ^ lane_mask) & 31, sim::kWarpShfl);
}
BI_DEV int warp_shfl_xor(int v, int lane_mask) {
  return sim_shfl(v, (sim::lane() ^ lane_mask) & 31, sim::kWarpShfl);
}
BI_DEV unsigned warp_shfl_xor(unsigned v, int lane_mask) {
  return sim_shfl(v, (sim::lane() ^ lane_mask) & 31, sim::kWarpShfl);
}
BI_DEV float warp_shfl(float v, int src_lane) { return sim_shfl(v, src_lane & 31, sim::kWarpShfl); }
BI_DEV int warp_shfl(int v, int src_lane) { return sim_shfl(v, src_lane & 31, sim::kWarpShfl); }
BI_DEV unsigned warp_shfl(unsigned v, int src_lane) { return sim_shfl(v, src_lane & 31, sim::kWarpShfl); }
BI_DEV unsigned warp_ballot(bool p) {
  const uint64_t* all = sim::warp_exchange(p ? 1u : 0u, sim::kWarpVote);
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= (all[l] ? 1u : 0u) << l;  // lanes beyond the warp: 0
  return m;
}
BI_DEV bool warp_any(bool p) { return warp_ballot(p) != 0u; }
BI_DEV bool warp_all(bool p) { return warp_ballot(p) == sim::warp_lane_mask(); }

template <typename T>
BI_DEV T* dynamic_smem() { return reinterpret_cast<T*>(sim::dynamic_smem_ptr()); }

#else  // device

BI_DEV void block_sync() { __syncthreads(); }
BI_DEV void warp_sync() { __syncwarp(0xffffffffu); }
BI_DEV float warp_shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
BI_DEV int warp_shfl_xor(int v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
BI_DEV unsigned warp_shfl_xor(unsigned v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
BI_DEV float warp_shfl(float v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BI_DEV int warp_shfl(int v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BI_DEV unsigned warp_shfl(unsigned v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }
BI_DEV unsigned warp_ballot(bool p) { return __ballot_sync(0xffffffffu, p); }
BI_DEV bool warp_any(bool p) { return __any_sync(0xffffffffu, p) != 0; }
BI_DEV bool warp_all(bool p) { return __all_sync(0xffffffffu, p) != 0; }

template <typename T>
BI_DEV T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char bi_dynamic_smem[];
  return reinterpret_cast<T*>(bi_dynamic_smem);
}

#endif

// ------------------------------------------------------------------------------------------
// fp32 arithmetic with explicit rounding (never fused / contracted by the compiler).
#ifdef BI_CUDA_SIM
// The simulator is compiled with -ffp-contract=off and SSE math: each operation below is one
// IEEE binary32 operation, round to nearest even, subnormals kept (as the device without ftz).
// A NaN result becomes the canonical NaN 0x7fffffff, as on the device (x86 would return the
// first operand's payload or the negative default NaN).
BI_DEV uint32_t float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
BI_DEV float uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
BI_DEV float sim_canon(float r) { return r == r ? r : uint_as_float(0x7fffffffu); }
BI_DEV float add_rn(float a, float b) { return sim_canon(a + b); }
BI_DEV float sub_rn(float a, float b) { return sim_canon(a - b); }
BI_DEV float mul_rn(float a, float b) { return sim_canon(a * b); }
BI_DEV float div_rn(float a, float b) { return sim_canon(a / b); }
BI_DEV float sqrt_rn(float a) { return sim_canon(std::sqrt(a)); }
BI_DEV float fma_rn(float a, float b, float c) { return sim_canon(std::fma(a, b, c)); }
BI_DEV float rint_rn(float a) { return sim_canon(std::nearbyint(a)); }  // ties to even (default mode)
#else
BI_DEV float add_rn(float a, float b) { return __fadd_rn(a, b); }
BI_DEV float sub_rn(float a, float b) { return __fsub_rn(a, b); }
BI_DEV float mul_rn(float a, float b) { return __fmul_rn(a, b); }
BI_DEV float div_rn(float a, float b) { return __fdiv_rn(a, b); }
BI_DEV float sqrt_rn(float a) { return __fsqrt_rn(a); }
BI_DEV float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
BI_DEV float rint_rn(float a) { return rintf(a); }  // cvt.rni.f32.f32
BI_DEV uint32_t float_as_uint(float f) { return __float_as_uint(f); }
BI_DEV float uint_as_float(uint32_t u) { return __uint_as_float(u); }
#endif

// ------------------------------------------------------------------------------------------
// Number formats. The simulator uses the host implementations of cuda_fp16.h / cuda_bf16.h
// (round to nearest even, canonical NaN), the device the cvt instructions: the same bits.
BI_DEV float to_f32(float v) { return v; }
BI_DEV float to_f32(__half v) { return __half2float(v); }
BI_DEV float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct FromF32;
template <> struct FromF32<float> { static BI_DEV float cvt(float v) { return v; } };
template <> struct FromF32<__half> { static BI_DEV __half cvt(float v) { return __float2half_rn(v); } };
template <> struct FromF32<__nv_bfloat16> {
  static BI_DEV __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};
template <typename T>
BI_DEV T from_f32(float v) { return FromF32<T>::cvt(v); }

}  // namespace cuda
}  // namespace bi
